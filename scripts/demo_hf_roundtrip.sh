#!/usr/bin/env bash
# Fresh-clone demo (CPU, well under 2 minutes): a small random xLSTM checkpoint in the transformers
# format written by our save_pretrained, read back by transformers (same logits), then greedy text
# from it with `python -m xlstm_jax generate --model DIR`.
# Run from the repository root:  bash scripts/demo_hf_roundtrip.sh   (PYTHON=... picks the interpreter)
set -eu
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
PY=${PYTHON:-python}
DIR=${DIR:-$(mktemp -d /tmp/xlstm_hf_demo.XXXXXX)}
echo "# 1. a random checkpoint of the demo preset (byte vocabulary) with save_pretrained -> $DIR"
$PY - "$DIR" <<'PY'
import sys

import jax
import numpy as np

from xlstm_jax.models.xlstm_lm import load_pretrained, preset_config, save_pretrained
from xlstm_jax.models.xlstm_lm.model import init_params

path = sys.argv[1]
config = preset_config("demo")
params = init_params(config, jax.random.key(0))
save_pretrained(path, config, params)
model, loaded = load_pretrained(path)
ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 24)).astype(np.int32)
ours = np.asarray(model.apply({"params": loaded}, ids), np.float64)
print(f"   {sum(x.size for x in jax.tree.leaves(params)):,} parameters written and read back")
try:
    import torch
    import transformers
except ImportError:
    print("   (transformers / torch not installed: the transformers check is skipped)")
else:
    hf = transformers.xLSTMForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.double().numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"   transformers {transformers.__version__} loads it: max relative logit difference {err:.1e}")
PY
echo "# 2. python -m xlstm_jax generate --model $DIR --prompt 'The ' --max-new-tokens 20 --greedy"
$PY -m xlstm_jax generate --model "$DIR" --prompt "The " --max-new-tokens 20 --greedy
