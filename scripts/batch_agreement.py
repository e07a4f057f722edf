"""How far a batched decode step drifts from the single-sequence one, in the dtype users run (torch).

    python scripts/batch_agreement.py --model paddleocr-vl --dtype bfloat16 --batch 4 --tokens 256

Every row is first decoded alone (greedy, EOS ignored), which gives its ids and its logits at every step. Then
all rows are prefilled into one engine's slots and fed THE SAME ids together (teacher forcing, so a first
disagreement does not derail the rest), and each batched step's logits are compared with the lone ones: top-1
agreement, and the largest absolute difference of the log-probabilities. The rows are the page at different
widths, so prompts are ragged and the length mask is exercised. Full-size random weights (scripts/bench.py
builds them once) unless --checkpoint is given; random weights have flat distributions, so near-ties (and thus
top-1 flips) are more frequent than with the real model: a pessimistic bound.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="paddleocr-vl", choices=["deepseek-ocr", "paddleocr-vl"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="decoded tokens per row (a page of text)")
    parser.add_argument("--checkpoint", type=Path, help="a snapshot instead of the full-size random one")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "page.png")
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from common.config import load_settings  # noqa: PLC0415
    from common.images import open_image  # noqa: PLC0415
    from common.pipeline import Pipeline, Request  # noqa: PLC0415
    from common.prompts import DEFAULT_PROMPTS  # noqa: PLC0415
    from scripts.bench import ensure_checkpoint  # noqa: PLC0415
    from torch_ocr.engine import Engine  # noqa: PLC0415

    checkpoint = args.checkpoint or ensure_checkpoint(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").touch()  # an empty config.toml: the built-in defaults
        settings = load_settings(Path(tmp) / "config.toml", {
            "model": args.model, "model_dir": str(checkpoint), "backend": "torch", "device": "cpu",
            "dtype": args.dtype})
    pipeline = Pipeline(settings)
    model = pipeline.load(args.model).model
    page = open_image(str(args.image))
    rows = []
    for b in range(args.batch):  # narrower copies: ragged prompt lengths
        width = max(64, page.width * (args.batch - b) // args.batch)
        image = page.resize((width, max(64, page.height * width // page.width)))
        request = Request(DEFAULT_PROMPTS[args.model], [image], model=args.model,
                          overrides={"ignore_eos": True, "max_new_tokens": args.tokens, "logprobs": 1})
        rows.append(pipeline.prepare(request))

    alone_ids, alone_logits = [], []
    for prepared in rows:
        engine = Engine(model, 1)
        engine.add(prepared.inputs, prepared.options, prepared.timings)
        ids, logits = [], []
        for _ in range(args.tokens):
            state = engine.slots.states[0]
            with torch.inference_mode():
                engine._forward()
            logits.append(torch.log_softmax(state.logits.float(), -1)[0])
            (out,) = engine.step()
            ids.append(out.token.token_id)
        alone_ids.append(ids)
        alone_logits.append(torch.stack(logits))
        print(f"row {len(alone_ids) - 1}: {len(prepared.inputs.input_ids)} prompt tokens, decoded alone", flush=True)

    engine = Engine(model, args.batch)
    for prepared in rows:
        engine.add(prepared.inputs, prepared.options, prepared.timings)
    agree = [0] * args.batch
    worst = [0.0] * args.batch
    with torch.inference_mode():
        for t in range(args.tokens):
            if t:  # feed every row its lone id of the previous step, all rows in one batched step
                tokens = torch.tensor([alone_ids[b][t - 1] for b in range(args.batch)])
                lengths = [len(r.inputs.input_ids) + t - 1 for r in rows]
                positions = torch.tensor([r.inputs.next_position + t - 1 for r in rows])
                step = model.step(tokens, positions, engine.cache.decode_view(lengths))
            for b in range(args.batch):
                logits = engine.slots.states[b].logits[0] if t == 0 else step[b]
                batched = torch.log_softmax(logits.float(), -1)
                agree[b] += int(batched.argmax()) == int(alone_logits[b][t].argmax())
                worst[b] = max(worst[b], float((batched - alone_logits[b][t]).abs().max()))
    print(f"\n{args.model} {args.dtype}, batch {args.batch}, {args.tokens} teacher-forced steps per row, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'row':<5}{'prompt':>8}{'top-1 agree':>13}{'max |dlogp|':>13}")
    for b in range(args.batch):
        print(f"{b:<5}{len(rows[b].inputs.input_ids):>8}{agree[b] / args.tokens:>13.4f}{worst[b]:>13.2e}")
    total = sum(agree) / (args.tokens * args.batch)
    print(f"all  {'':>8}{total:>13.4f}{max(worst):>13.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
