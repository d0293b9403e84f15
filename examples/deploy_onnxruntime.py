"""The code a deployer writes: onnxruntime + numpy + Pillow, everything else read from the model.

python examples/deploy_onnxruntime.py runs/quickstart-*/model.int8.onnx photo.png [more.png ...]
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map  # class names, input layout/size, normalization, top-1
if meta["input_dtype"] != "uint8":
    sys.exit("this model takes normalized floats (exported with preprocess_in_graph: false); use compress/deploy.py")
classes, (height, width) = json.loads(meta["class_names"]), json.loads(meta["image_size"])
for path in sys.argv[2:]:
    image = Image.open(path).convert(meta["color_mode"])
    if "resize_shorter" in meta:  # shorter side to this, then the center height x width (an image-folder model)
        side, (w, h) = int(meta["resize_shorter"]), image.size
        image = image.resize((side, int(side * h / w)) if w <= h else (int(side * w / h), side), Image.BILINEAR)
        left, top = round((image.width - width) / 2), round((image.height - height) / 2)
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8).reshape(1, height, width, -1)  # NHWC uint8: normalized in the graph
    if meta["input_layout"] == "nchw":
        pixels = pixels.transpose(0, 3, 1, 2)
    logits = session.run(None, {meta["input_name"]: pixels})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    print(f"{path}: {classes[int(probs.argmax())]} ({probs.max():.1%})")
