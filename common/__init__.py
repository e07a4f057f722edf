"""Framework-free core of deepseek-ocr: config, assets, prompts, preprocessing, tokenizer, sampling rules,
output and the pipeline shared by the CLI and the server. Never imports torch or mlx."""
