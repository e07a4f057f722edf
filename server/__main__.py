"""`python -m server`: the same as the deepseek-ocr-server console script."""
import sys

from .app import main

sys.exit(main())
