"""edgeqa-runtime: what runs on the edge device, with no torch. It owns the answer schema and its strict parser
(`schema`), the image preprocessing shared with training (`preprocess`) and the ONNX session that answers
(`session`). The training side (`edgeqa`) imports schema and preprocessing from here, so each is defined once.
"""

__version__ = "0.1.0"
