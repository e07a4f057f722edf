"""The CLI's documents mode: many inputs, every page its own answer, batched, written as each finishes.

`deepseek-ocr-cli scans/ report.pdf --output-dir out` lands here (`common.cli.ocr` routes bare arguments,
`--pdf`, and a lone `--image` that is a PDF or goes to `--output-dir`/jsonl). Documents are opened before the
model loads (a missing file or a bad `--pages` fails at once); pages are decoded lazily and decoded N at a time
through `Pipeline.map` (`common.documents.run_pages`); each finished page is printed (text, jsonl) and written
(`common.results.OutputDir`) in input order. A page that cannot be read is reported on stderr and the run goes
on; the run then ends with one `error:` line naming how many failed (exit 2). Ctrl-C keeps what is written and,
in json mode, still prints the object with the finished pages.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class RunOptions:
    output_dir: Path | None
    resume: bool
    overwrite: bool
    recursive: bool
    batch_size: int | None
    out_format: str
    clean: bool
    bench: bool

    @property
    def wants_documents(self) -> bool:
        """Options that only make sense per page (so a lone --image becomes a document)."""
        return self.output_dir is not None or self.out_format == "jsonl" or self.resume


def documents_named(inputs: list[str], images: list[str], pdf: str | None, options: RunOptions) -> list[str]:
    """The documents of this command line ([] for the one-request forms), refusing every mix that could be
    read two ways."""
    from .pdf import is_pdf_file  # noqa: PLC0415

    if options.resume and options.output_dir is None:
        raise UserError("--resume needs --output-dir (the folder holding the finished pages)")
    if pdf is not None:
        if images:
            raise UserError("give --pdf or --image, not both: a PDF's pages are read one per request")
        return [pdf, *inputs]
    if inputs and images:
        raise UserError("give files to read (each its own answer) or --image (one prompt over all its images), "
                        "not both; note that `--image *.png` leaves all but the first file outside --image: "
                        "drop --image to read each file on its own")
    if inputs:
        return inputs
    local = [name for name in images if not name.startswith(("http://", "https://"))]
    pdfs = [name for name in local if is_pdf_file(Path(name).expanduser())]
    if len(images) > 1:
        if pdfs:
            raise UserError(f"--image {pdfs[0]} is a PDF: give it alone (each page is read on its own, with the "
                            "same prompt), or list several files as arguments")
        if options.wants_documents:
            raise UserError("--output-dir, --resume and --format jsonl read documents page by page: list the "
                            "files as arguments (several --image make ONE prompt)")
        return []
    if images and (pdfs or options.wants_documents or images[0].lower().endswith(".pdf")):
        return images
    return []


def ocr_documents(settings: Any, names: list[str], prompt: str, overrides: dict[str, Any], pages: str | None,
                  dpi: str | None, task: str | None, options: RunOptions) -> None:
    """Run every page of `names` (see the module docstring)."""
    from .cli import _dpi, _fetch  # noqa: PLC0415
    from .documents import discover, open_document  # noqa: PLC0415
    from .pdf import DEFAULT_DPI  # noqa: PLC0415

    found, skipped_files = discover(names, recursive=options.recursive, fetch=_fetch)
    if skipped_files:
        print(f"note: {skipped_files} file(s) in the folders given are neither images nor PDFs: not read",
              file=sys.stderr)
    resolution = DEFAULT_DPI if dpi is None else _dpi(dpi)
    docs, failed = [], []
    for item in found:
        try:
            docs.append(open_document(item, pages=pages, dpi=resolution))
        except UserError as error:
            if len(found) == 1:
                raise
            failed.append((item.name, None, str(error)))
            print(f"warning: {item.name}: {error} (skipped; the others go on)", file=sys.stderr)
    if (pages is not None or dpi is not None) and not any(d.kind in ("pdf", "tiff") for d in docs):
        raise UserError("--pages and --dpi are PDF options: add --pdf FILE (or an --image that is a PDF)")
    writer = _writer(settings, prompt, overrides, resolution, options)
    if writer is not None:
        writer.check(docs)
    _Run(settings, docs, prompt, overrides, task, options, writer, failed, multi=len(found) > 1).go()


def _writer(settings: Any, prompt: str, overrides: dict[str, Any], dpi: int, options: RunOptions) -> Any:
    if options.output_dir is None:
        return None
    import dataclasses  # noqa: PLC0415

    from .results import OutputDir  # noqa: PLC0415

    run_settings = {"model": settings.active_model, "files": repr(settings.entry()), "prompt": prompt, "dpi": dpi,
                    "overrides": overrides, "inference": dataclasses.asdict(settings.inference)}
    return OutputDir(options.output_dir, settings=run_settings, resume=options.resume,
                     overwrite=options.overwrite)


class _Run:
    """One documents run: jobs in, pages out (printed, written, counted)."""

    def __init__(self, settings: Any, docs: list[Any], prompt: str, overrides: dict[str, Any], task: str | None,
                 options: RunOptions, writer: Any, failed: list[tuple[str, int | None, str]], *,
                 multi: bool) -> None:
        self.settings, self.docs, self.prompt, self.overrides = settings, docs, prompt, overrides
        self.options, self.writer, self.failed = options, writer, failed
        self.plain_label = task or "text"
        self.multi = multi  # several inputs: every page names its document
        self.results: list[Any] = []
        self.records: dict[str, list[dict[str, Any]]] = {doc.input.out_name: [] for doc in docs}
        self.flagged: list[str] = []
        self.streamed_job: Any = None
        self.total = sum(len(doc.pages) for doc in docs)
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------------ driving
    def go(self) -> None:
        from .documents import run_pages  # noqa: PLC0415
        from .pipeline import Pipeline, Request  # noqa: PLC0415

        pipeline = Pipeline(self.settings, max_resident=1)
        batch = self._batch_size(pipeline)
        streaming = batch == 1 and self.options.out_format == "text" and not self.options.clean
        self.bar = self._bar(streaming)

        def request_for(job: Any) -> Any:
            return Request(prompt=self.prompt, images=[job.image], model=self.settings.active_model,
                           overrides=dict(self.overrides))

        try:
            for job, outcome in run_pages(pipeline, self._jobs(), request_for, batch,
                                          on_text=self._stream_piece if streaming else None):
                self._finish(job, outcome)
                job.image = None  # one page image held at a time (beyond what a batch needs)
        except KeyboardInterrupt:
            self._close(interrupted=True)
            raise
        self._close(interrupted=False)

    def _batch_size(self, pipeline: Any) -> int:
        if self.options.batch_size is not None:
            return self.options.batch_size
        if self.total <= 1:
            return 1
        from .assets import resolve_model_files  # noqa: PLC0415
        from .batch_size import default_batch_size, free_memory, kv_shape  # noqa: PLC0415
        from .models import read_json  # noqa: PLC0415

        model = pipeline.load(self.settings.active_model)
        files = resolve_model_files(self.settings.active_model, self.settings.entry(), progress=False)
        size = default_batch_size(kv_shape(read_json(Path(files.config))),
                                  max_new_tokens=self.settings.inference.max_new_tokens, dtype=model.dtype,
                                  device=model.device, free_bytes=free_memory(model.device))
        return min(size, self.total)

    def _bar(self, streaming: bool) -> Any:
        from tqdm import tqdm  # noqa: PLC0415

        # A bar on the terminal the answer streams to would be cut through by the text.
        quiet = {"disable": True} if streaming and sys.stdout.isatty() else {}
        return tqdm(total=self.total, unit="page", desc="pages", file=sys.stderr, **quiet)

    def _jobs(self) -> Any:
        from .documents import PageJob  # noqa: PLC0415

        for doc in self.docs:
            done = {n: r for n in doc.pages if self.writer is not None and (r := self.writer.finished(doc, n))}
            for number, image in doc.iter_pages(skip=set(done)):
                if number in done:
                    yield PageJob(doc, number, record=done[number])
                elif isinstance(image, UserError):
                    yield PageJob(doc, number, error=image)
                else:
                    yield PageJob(doc, number, image=image)

    # ------------------------------------------------------------------------------------------ one page
    def _finish(self, job: Any, outcome: Any) -> None:
        from .results import flags, page_record  # noqa: PLC0415

        error = job.error or (outcome if isinstance(outcome, UserError) else None)
        doc = job.document
        if error is not None:
            self.failed.append((doc.name, job.number if doc.kind != "image" else 0, str(error)))
            self.bar.write(f"warning: {self._where(doc, job.number)}: {error} (the run goes on)", file=sys.stderr)
            if self.writer is not None:
                self.writer.fail_page(doc, job.number, str(error))
            self._emit_error(doc, job.number, str(error))
        else:
            if job.record is not None:
                record = job.record
            else:
                record, layout = page_record(doc.name, job.number, doc.page_count, outcome.text, job.image.size,
                                             plain_label=self.plain_label, result=outcome)
                if self.overrides.get("logprobs"):
                    from .cli import _as_json  # noqa: PLC0415

                    record["logprobs"] = _as_json(outcome, False, [job.image])["logprobs"]
            # Booked before the files are written: a Ctrl-C while writing still reports this finished page.
            self.records[doc.input.out_name].append(record)
            if job.record is None:
                self.results.append(outcome)
                if self.writer is not None:
                    self.writer.write_page(doc, record, layout, job.image)
            if flags(record):
                self.flagged.append(f"{self._where(doc, job.number)} ({', '.join(flags(record))})")
            self._emit(doc, record)
        self.bar.update(1)
        minutes = (time.perf_counter() - self.started) / 60
        if self.results and minutes > 0:
            self.bar.set_postfix_str(f"{len(self.results) / minutes:.1f} pages/min", refresh=False)

    def _where(self, doc: Any, number: int) -> str:
        return doc.name if doc.kind == "image" else f"{doc.name} page {number}"

    def _marker(self, doc: Any, number: int) -> str | None:
        if self.multi:
            return f"<!-- {self._where(doc, number)} -->"
        return f"<!-- page {number} -->" if doc.kind != "image" else None

    def _stream_piece(self, job: Any, piece: str) -> None:
        if self.streamed_job is not job:
            self.streamed_job = job
            self._write_marker(job.document, job.number)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def _write_marker(self, doc: Any, number: int) -> None:
        marker = self._marker(doc, number)
        first = not getattr(self, "_printed", False)
        self._printed = True
        if marker is not None:
            sys.stdout.write(("" if first else "\n") + marker + "\n\n")

    def _emit(self, doc: Any, record: dict[str, Any]) -> None:
        fmt = self.options.out_format
        if fmt == "jsonl":
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif fmt == "text":
            text = record["markdown"] if self.options.clean else record["text"]
            if self.streamed_job is None or self.streamed_job.number != record["page"] or \
                    self.streamed_job.document is not doc:
                self._write_marker(doc, record["page"])
                sys.stdout.write(text)
            self.streamed_job = None
            if text and not text.endswith("\n"):
                sys.stdout.write("\n")
        sys.stdout.flush()

    def _emit_error(self, doc: Any, number: int, message: str) -> None:
        if self.options.out_format == "jsonl":
            sys.stdout.write(json.dumps({"input": doc.name, "page": number, "error": message},
                                        ensure_ascii=False) + "\n")
            sys.stdout.flush()

    # ------------------------------------------------------------------------------------------ the end
    def _close(self, interrupted: bool) -> None:
        self.bar.close()
        if self.options.out_format == "json":
            self._dump_json(interrupted)
        if interrupted:
            return
        if self.options.out_format != "json":
            self._summary()
        if self.options.bench and self.results:
            from .cli import _bench_table, _summed  # noqa: PLC0415

            print(_bench_table(_summed(self.results), pages=len(self.results)), file=sys.stderr)
        if self.failed:
            # Page 0 is a one-page image, None a document that could not be opened: both named alone.
            where = "; ".join(f"{name}" + (f" page {n}" if n else "") + f": {m}" for name, n, m in self.failed[:3])
            more = f" (+{len(self.failed) - 3} more)" if len(self.failed) > 3 else ""
            raise UserError(f"{len(self.failed)} of {self.total + sum(n is None for _, n, _ in self.failed)} "
                            f"page(s) failed: {where}{more}")

    def _dump_json(self, interrupted: bool) -> None:
        def document(doc: Any) -> dict[str, Any]:
            return {"input": doc.name, "page_count": doc.page_count, "pages": self.records[doc.input.out_name]}

        data: dict[str, Any] = document(self.docs[0]) if not self.multi else {
            "documents": [document(doc) for doc in self.docs]}
        data["failed"] = [{"input": name, "page": n if n != 0 else 1, "error": m} for name, n, m in self.failed]
        data["flagged"] = self.flagged
        if interrupted:
            data["interrupted"] = True
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def _summary(self) -> None:
        from .cli import _summed  # noqa: PLC0415

        wall_s = time.perf_counter() - self.started
        done = sum(len(r) for r in self.records.values())
        if self.results:
            total = _summed(self.results)
            finishes = ", ".join(f"{sum(r.finish_reason == f for r in self.results)} {f}"
                                 for f in sorted({r.finish_reason for r in self.results}))
            print(f"[{total.model} {total.backend}/{total.device}/{total.dtype}] {done} page(s) of "
                  f"{self._page_count()}: {total.prompt_tokens} prompt + {total.completion_tokens} generated "
                  f"tokens, finish: {finishes}, {wall_s:.2f} s", file=sys.stderr)
        resumed = done - len(self.results)
        if resumed:
            print(f"{resumed} page(s) finished by an earlier run (--resume): not read again", file=sys.stderr)
        if self.flagged:
            print(f"flagged {len(self.flagged)} page(s): {'; '.join(self.flagged)} "
                  "(length: hit --max-new-tokens; looped: ends in a repetition loop)", file=sys.stderr)
        if self.writer is not None:
            print(f"results in {self.options.output_dir}", file=sys.stderr)

    def _page_count(self) -> int:
        return self.docs[0].page_count if not self.multi else self.total


def render(text_file: str, image: str, output_dir: str | None, out_format: str, overwrite: bool,
           page: int, label: str) -> None:
    """Post-process model text produced elsewhere: the same records and files as a run, no model loaded."""
    from .documents import Document, Input, _digest  # noqa: PLC0415
    from .images import open_image  # noqa: PLC0415
    from .results import OutputDir, page_record  # noqa: PLC0415

    try:
        text = Path(text_file).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {text_file}: {getattr(exc, 'strerror', None) or exc}") from None
    path = Path(image).expanduser()
    picture = open_image(path)
    item = Input(image, path, path.with_suffix("").name)
    doc = Document(item, "image", page, [page], _digest(path))
    record, layout = page_record(image, page, page, text, picture.size, plain_label=label)
    if output_dir is not None:
        writer = OutputDir(Path(output_dir).expanduser(), settings={"render": text_file}, overwrite=overwrite)
        writer.check([doc])
        writer.write_page(doc, record, layout, picture)
    if out_format == "text":
        sys.stdout.write(layout.markdown + "\n")
    else:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
