"""CPU shim, loaded automatically by Python because this folder is on the SGLang server's PYTHONPATH (CPU only).

torchvision from PyPI is a CUDA build; beside CPU torch its C extension does not load, so `torchvision::nms` and
`torchvision::qnms` are never declared and `import torchvision` dies in `register_fake("torchvision::nms")`.
transformers imports torchvision when it is installed, and SGLang imports transformers, so the server cannot start.
Declaring the two schemas before torchvision loads is enough (no kernel is ever called on the text-only path).

To keep every other process cheap, torch is not imported here: a one-shot import hook declares the schemas only when
something first imports torchvision.
"""
import importlib.abc
import sys


class _DeclareTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP.append(lib)  # a Library deregisters its definitions when garbage-collected
        return None  # let the normal finders import torchvision


_KEEP: list = []
sys.meta_path.insert(0, _DeclareTorchvisionSchemas())
