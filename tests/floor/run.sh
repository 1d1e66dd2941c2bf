#!/usr/bin/env bash
# The core tests (towers, formats, the LLaVA drop-in, VLM checkpoints, projectors, preprocessing) in a
# second environment holding the oldest supported versions: LLaVA's pins (tests/floor/requirements.txt).
# pip resolves those pins and vision-tower's own requirements together, so this also proves they install
# side by side. Tests needing what that environment lacks (timm, open_clip, transformers 5 classes) skip.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-floor
.venv-floor/bin/pip install -q -r tests/floor/requirements.txt -e .
.venv-floor/bin/python -c "import torch, transformers; print(f'floor: torch {torch.__version__}, transformers {transformers.__version__}')"
.venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_tower_api.py tests/test_parity.py \
    tests/test_preprocess.py tests/test_llava.py tests/test_llava_model.py tests/test_vlm_checkpoints.py \
    tests/test_projector.py tests/test_projector_formats.py tests/test_architecture.py tests/test_imagetext.py
