"""The package logger; ALPHAQUANT_DEBUG=1 turns on debug output."""
import logging
import os

logger = logging.getLogger("alphaquant")
if os.environ.get("ALPHAQUANT_DEBUG", "") not in ("", "0"):
    logger.setLevel(logging.DEBUG)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[alphaquant %(levelname)s] %(message)s"))
        logger.addHandler(handler)
