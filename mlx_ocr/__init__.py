"""MLX backend: DeepSeek-OCR and PaddleOCR-VL loaded from their original hub checkpoints (mirrors torch_ocr)."""
