"""Where the data shared beside the project lives (``../shared/data``), for the tests that read it."""
from pathlib import Path

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-karpathy"
