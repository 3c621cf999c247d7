"""Centralized SASRec reference: the Stage 1 model on every user's windows pooled, no federation.

    python bench/centralized_reference.py OUT_DIR EPOCHS [key=value ...]   (ML-1M, 1,000 users)
"""

import json
import logging
import sys
import time
from pathlib import Path

from feddmmr.centralized import run_centralized
from feddmmr.config import apply_overrides, load_preset
from feddmmr.data.dataset import load_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    config = load_preset("stage1_backbone")
    apply_overrides(config, dict(arg.split("=", 1) for arg in sys.argv[3:]), "command line")
    data = load_dataset(DATA, top_users=config.top_users)
    start = time.time()
    history = run_centralized(config, data, Path(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps({"seconds": round(time.time() - start, 1),
                      **{k: {m: round(x, 4) for m, x in v.items() if isinstance(x, float)}
                         for k, v in history["final"].items()}}, indent=1))
