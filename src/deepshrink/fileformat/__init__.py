"""The ``.dsz`` file format.

- :mod:`.codec`: bytes <-> CompressedTensors and plain arrays (no model code);
- :mod:`.model_io`: models to and from files (``save``, ``load``, ``load_into``,
  ``read``; also ``deepshrink.save`` etc.) and the factory trust policy;
- :mod:`.info`: where every byte of a file goes (``deepshrink info``);
- :mod:`.export`: dense safetensors / ONNX.
"""

from deepshrink.lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
