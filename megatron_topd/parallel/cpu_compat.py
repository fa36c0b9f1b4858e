"""The one place that adapts Megatron-Core to CPU + gloo. Applied only when CUDA is absent.

Megatron-Core 0.19.2 hard-codes CUDA in a handful of modules (buffers on `torch.cuda.current_device()`,
`device="cuda"` literals, `torch.cuda.synchronize()`/streams, CUDA RNG state, `'torch.cuda.FloatTensor'` type checks).
Everything else runs unchanged on CPU. We adapt exactly those modules, in two ways:

1. `torch` proxy: inside each listed module the global name `torch` is rebound to `_CpuTorch`, which forwards every
   attribute to the real torch except `torch.cuda` (a CPU stand-in: current_device() is the CPU, synchronize and
   streams are no-ops, the RNG calls use the CPU generator) and the tensor factories, which map a CUDA device to
   the CPU. Code outside these modules, and torch itself, are untouched.
2. Source substitutions: a few functions compare `tensor.type()` with CUDA type strings (and one trips over the
   torch-Adam `step` state when loading a reshardable optimizer checkpoint); they are recompiled from
   their own source with the strings replaced. Each substitution must match exactly once, so a Megatron-Core version
   that moved or rewrote the code fails loudly in `apply()` (and in tests/unit/test_cpu_compat.py), never silently.

Nothing here is used on GPUs. Supported version: SUPPORTED_MCORE.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import textwrap
import types

import torch

SUPPORTED_MCORE = ("0.19.",)

# Modules whose global `torch` is replaced by the proxy.
PROXIED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",  # TopKRouter.gating moves its weight to torch.cuda.current_device()
    "megatron.core.transformer.moe.token_dispatcher",  # alltoall dispatcher makes a torch.cuda.Stream() at build
    "megatron.core.tensor_parallel.mappings",  # TP>1 all-gathers allocate on the CUDA device
    "megatron.core.transformer.utils",
)

_CUDA_TYPES = (
    ("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"),
    ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
    ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'"),
)
# (module, qualified function name, [(old, new, expected count)])
SOURCE_SUBSTITUTIONS = (
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
        [("if model_param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']:",
          "if model_param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']:", 1),
         ("elif model_param.type() == 'torch.cuda.FloatTensor':",
          "elif model_param.type() == 'torch.FloatTensor':", 1)],
    ),
    # Not CUDA but the torch-Adam path that CPU runs take (no TE/apex fused Adam): Megatron gives every Adam state a
    # tensor "step", then loading a fully reshardable optimizer checkpoint looks that key up among the per-parameter
    # tensors it skipped on purpose (KeyError: 'step'). Skip keys the checkpoint does not carry.
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        [("if not isinstance(tensors[key], torch.Tensor):", "if not isinstance(tensors.get(key), torch.Tensor):", 1)],
    ),
    # Tied embeddings at PP>1: the last stage's copy of the embedding is moved to CUDA before the all-reduce.
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        [("weight.data = weight.data.cuda()", "weight.data = weight.data", 1)],
    ),
    (
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        [("assert param.grad.type() == 'torch.cuda.FloatTensor'", "assert param.grad.type() == 'torch.FloatTensor'", 1)],
    ),
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


class _NullStream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self):
        pass


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuCuda(types.SimpleNamespace):
    """What the proxied modules see as `torch.cuda`: the CPU, with no-op synchronisation and the CPU RNG."""

    def __getattr__(self, name):  # anything not adapted behaves as real torch.cuda (and fails as it would)
        return getattr(torch.cuda, name)


def _make_cpu_cuda() -> _CpuCuda:
    return _CpuCuda(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        current_stream=lambda *a, **k: _NullStream(),
        default_stream=lambda *a, **k: _NullStream(),
        Stream=lambda *a, **k: _NullStream(),
        stream=lambda s=None: contextlib.nullcontext(),
        Event=_NullEvent,
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.default_generator.manual_seed(seed),
        random=types.SimpleNamespace(get_rng_state=lambda device=None: torch.get_rng_state()),
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                   range=lambda *a, **k: contextlib.nullcontext()),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        is_current_stream_capturing=lambda: False,
    )


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "zeros_like",
              "empty_like", "ones_like", "full_like", "as_tensor")


class _CpuTorch(types.ModuleType):
    """Forwards to the real torch; `cuda` is the CPU stand-in and factories move `device=cuda` to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cpu_cuda()
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


# Module-level functions rebound by name: (module, name, replacement).
REBOUND_FUNCTIONS = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_get_rng_state),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _cpu_set_rng_state),
)

_applied = False


class CpuCompatError(RuntimeError):
    """Megatron-Core changed where cpu_compat expects it: update the adaptation for the new version."""


def check_version() -> str:
    import megatron.core

    version = getattr(megatron.core, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("megatron-core")
    if not version.startswith(SUPPORTED_MCORE):
        raise CpuCompatError(
            f"megatron-core {version} is installed; the CPU adaptations were written for {SUPPORTED_MCORE}. "
            "Install megatron-core==0.19.2 (make setup) or review megatron_topd/parallel/cpu_compat.py."
        )
    return version


def _resolve(module, qualname):
    owner, name = module, qualname
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    name = parts[-1]
    return owner, name, inspect.getattr_static(owner, name)


def _recompile(module, qualname, substitutions):
    owner, name, attr = _resolve(module, qualname)
    func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
    source = textwrap.dedent(inspect.getsource(func))
    for old, new, count in substitutions:
        found = source.count(old)
        if found != count:
            raise CpuCompatError(
                f"{module.__name__}.{qualname}: expected {count} occurrence(s) of {old!r}, found {found}; "
                "Megatron-Core moved this code: update megatron_topd/parallel/cpu_compat.py"
            )
        source = source.replace(old, new)
    namespace: dict = {}
    exec(compile(source, f"<cpu_compat {module.__name__}.{qualname}>", "exec"), module.__dict__, namespace)
    new_attr = namespace[name]
    if isinstance(attr, (staticmethod, classmethod)) and not isinstance(new_attr, (staticmethod, classmethod)):
        new_attr = type(attr)(new_attr)
    setattr(owner, name, new_attr)
    _rebind_imported_copies(func, new_attr)


def _rebind_imported_copies(old, new) -> None:
    """`from x import f` made copies of the name in other Megatron modules: point those at the new object too."""
    import sys

    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.core") and mod is not None:
            for attr_name, value in list(vars(mod).items()):
                if value is old:
                    setattr(mod, attr_name, new)


def verify() -> list[str]:
    """Every name and source pattern the adaptations rely on, checked without changing anything.

    Returns the list of problems (empty when this Megatron-Core version is what cpu_compat was written for).
    """
    problems = []
    for mod_name in PROXIED_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            problems.append(f"{mod_name}: cannot import ({exc})")
            continue
        if not isinstance(module.__dict__.get("torch"), types.ModuleType):
            problems.append(f"{mod_name}: has no global 'torch' to adapt")
    for mod_name, name, _ in REBOUND_FUNCTIONS:
        module = importlib.import_module(mod_name)
        if not callable(getattr(module, name, None)):
            problems.append(f"{mod_name}.{name}: function not found")
    for mod_name, qualname, substitutions in SOURCE_SUBSTITUTIONS:
        module = importlib.import_module(mod_name)
        try:
            _, _, attr = _resolve(module, qualname)
        except AttributeError:
            problems.append(f"{mod_name}.{qualname}: not found")
            continue
        func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
        source = inspect.getsource(func)
        for old, _, count in substitutions:
            if source.count(old) != count:
                problems.append(f"{mod_name}.{qualname}: pattern {old!r} found {source.count(old)}x, expected {count}")
    return problems


def apply(force: bool = False) -> bool:
    """Adapt Megatron-Core to the CPU. No-op when CUDA is available (unless force) or when already applied."""
    global _applied
    if _applied or (torch.cuda.is_available() and not force):
        return False
    check_version()
    problems = verify()
    if problems:
        raise CpuCompatError("Megatron-Core does not match megatron_topd/parallel/cpu_compat.py:\n  " + "\n  ".join(problems))
    proxy = _CpuTorch()
    for mod_name in PROXIED_MODULES:
        importlib.import_module(mod_name).torch = proxy
    for mod_name, name, replacement in REBOUND_FUNCTIONS:
        module = importlib.import_module(mod_name)
        old = getattr(module, name)
        setattr(module, name, replacement)
        _rebind_imported_copies(old, replacement)
    for mod_name, qualname, substitutions in SOURCE_SUBSTITUTIONS:
        _recompile(importlib.import_module(mod_name), qualname, substitutions)
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
