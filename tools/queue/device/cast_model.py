"""``python cast_model.py SRC DST``: the float16 checkpoint in SRC as float32 in DST."""

import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
tensors = load_file(os.path.join(src, "model.safetensors"))
save_file(
    {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()},
    os.path.join(dst, "model.safetensors"),
)
for name in os.listdir(src):
    if name != "model.safetensors":
        shutil.copy(os.path.join(src, name), dst)
