"""LoRA (Hu et al., 2021): W x + (alpha / r) B A x, with W frozen and only A [r, in], B [out, r] trained.

`LoRALinear` is an `nn.Linear` with two extra parameters, so a wrapped projection keeps its state-dict
key (`layers.0.attention.wq.weight`) and the adapter sits beside it (`...wq.lora_a`, `...wq.lora_b`): the
base checkpoint loads unchanged, and the adapter alone is the state dict's `lora_` entries.
B starts at zero, so a freshly wrapped model computes exactly what the base model did.
"""

import hashlib
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer, check_state_dict, load_state_dict, native_args, release_pages, resolve_weights

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # every attention and MLP projection
ADAPTER_WEIGHTS = "adapter.pth"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # The base weight is shared with `base`, not copied: build the nn.Linear part on meta, then assign.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        device, in_features, out_features = base.weight.device, base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # No dropout is no module that reads self.training: a compiled block then has one graph for training
        # and evaluation alike, not one per mode.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # Adapters stay fp32 even when the frozen base weight is bf16: their updates are small.
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        self.adapters_enabled = True
        self.reset_lora()

    def reset_lora(self):
        if self.lora_a.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear, and PEFT's default
            nn.init.zeros_(self.lora_b)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return out
        a, b = self.lora_a, self.lora_b
        delta = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scale
        return out + delta.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())
        return w.to(self.weight.dtype)


def _targets(model: nn.Module, targets):
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in targets:
            yield name, module


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=DEFAULT_TARGETS):
    """Replace each targeted nn.Linear (by its attribute name) with a LoRALinear sharing its weight."""
    if rank <= 0:
        raise ValueError(f"--lora_rank must be positive, got {rank}")
    found = list(_targets(model, set(targets)))
    if not found:
        raise ValueError(f"--lora_targets {list(targets)} match no linear layer (choose from {DEFAULT_TARGETS})")
    for name, linear in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(linear, rank, alpha, dropout))
    return model


def lora_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_trainable(model: nn.Module, unfrozen_patterns=()):
    """Freeze everything but the adapters and any parameter whose name matches an --lora_unfrozen_params
    regex (e.g. 'norm' or 'tok_embeddings')."""
    regexes = [re.compile(p) for p in unfrozen_patterns]
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or any(r.search(name) for r in regexes)


def set_adapters(model: nn.Module, enabled: bool):
    """Adapters off = the base model: DPO's and GRPO's reference without a second copy in memory."""
    for m in lora_modules(model):
        m.adapters_enabled = enabled


@contextmanager
def adapters_off(model: nn.Module, enabled: bool = True):
    """The base model for the time of a forward (when `enabled`: a run without LoRA has nothing to switch)."""
    if enabled:
        set_adapters(model, False)
    try:
        yield
    finally:
        if enabled:
            set_adapters(model, True)


def adapter_state_dict(model_state: dict) -> dict:
    return {k: v for k, v in model_state.items() if ".lora_" in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn the LoRALinear back into a plain nn.Linear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                               device="meta")
            linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            linear.bias = module.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, linear)
    return model


def merged_state_dict(model_state: dict, rank: int, alpha: float) -> dict:
    """Merge adapters into a full state dict (e.g. one gathered from FSDP shards) without a model."""
    out = {}
    scale = alpha / rank
    for k, v in model_state.items():
        if ".lora_" in k:
            continue
        if k.endswith(".weight") and k[: -len("weight")] + "lora_a" in model_state:
            prefix = k[: -len("weight")]
            delta = model_state[prefix + "lora_b"].float() @ model_state[prefix + "lora_a"].float()
            v = (v.float() + scale * delta).to(v.dtype)
        out[k] = v
    return out


def save_adapter(path: Path, adapter_state: dict, rank: int, alpha: float, targets):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(adapter_state, path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"rank": rank, "alpha": alpha, "targets": list(targets)},
                                                  indent=2) + "\n")


def read_adapter_config(weights_path: Path) -> dict:
    config = Path(weights_path).parent / ADAPTER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{weights_path} holds LoRA tensors but {config} (rank, alpha) is missing")
    return json.loads(config.read_text())


# -- loading: a base checkpoint with adapters stacked on it ----------------------------------------------------
def resolve(path) -> Path:
    """A LoRA adapter dir -> its adapter.pth; anything else as model.resolve_weights."""
    path = Path(path)
    if path.is_dir() and (path / ADAPTER_WEIGHTS).is_file():
        return path / ADAPTER_WEIGHTS
    return resolve_weights(path)


def stacked_source(paths) -> tuple[dict, callable]:
    """A base checkpoint and its overlays, in order, one tensor at a time: (every tensor's name -> its last stored
    version, memory-mapped, for shapes and dtypes; tensor(name) -> that tensor stacked). A LoRA adapter merges
    into the weight so far (in its dtype), any other overlay replaces the tensors it holds. Nothing is merged
    or read until asked for, so a process that needs only its FSDP shards reads only those rows."""
    weights = [resolve(p) for p in paths]
    base = load_state_dict(weights[0])
    stored, layers = dict(base), []  # layers: (overlay, alpha / r for an adapter, None for plain tensors)
    for w in weights[1:]:
        overlay = load_state_dict(w)
        scale = None
        if any(".lora_" in k for k in overlay):
            config = read_adapter_config(w)
            check_adapter(stored, overlay, w)
            scale = config["alpha"] / config["rank"]
        layers.append((overlay, scale))
        stored.update({k: v for k, v in overlay.items() if ".lora_" not in k})

    def tensor(name: str, rows: slice | None = None) -> torch.Tensor:
        """rows None: the tensor as stored, a view of the mapping unless something merges into it (a parameter
        may keep it: no copy). rows a slice of dim 0 (a process's FSDP shard, or all of them): a copy of those
        rows, merged, with the mapping's pages given back, so reading a share of each tensor holds that share."""
        mapped, prefix = [], name[: -len("weight")]

        def read(t):
            mapped.append(t if rows is None else t[rows])
            return mapped[-1]
        value = read(base[name]) if name in base else None
        for overlay, scale in layers:
            if name in overlay:
                value = read(overlay[name])
            elif scale is not None and name.endswith(".weight") and prefix + "lora_a" in overlay:
                b = overlay[prefix + "lora_b"] if rows is None else overlay[prefix + "lora_b"][rows]
                value = (value.float() + scale * (b.float() @ overlay[prefix + "lora_a"].float())).to(value.dtype)
        if rows is not None:
            value = value.clone() if any(value is t for t in mapped) else value
            for t in mapped:
                release_pages(t)
        return value
    return stored, tensor


def stacked_state(paths) -> dict:
    """The whole stacked state dict (see stacked_source): memory-mapped where untouched."""
    stored, tensor = stacked_source(paths)
    return {k: tensor(k) for k in stored}


def check_adapter(state: dict, adapter: dict, source: Path):
    """Every lora_a [r, in] / lora_b [out, r] pair must fit a weight [out, in] of the model so far."""
    for prefix in sorted({k.rsplit("lora_", 1)[0] for k in adapter if ".lora_" in k}):
        a, b, weight = (d.get(prefix + n) for d, n in ((adapter, "lora_a"), (adapter, "lora_b"), (state, "weight")))
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        if a is None or b is None or weight is None or b.shape[1] != a.shape[0] \
                or (b.shape[0], a.shape[1]) != weight.shape:
            raise ValueError(f"LoRA adapter {source}: {prefix}lora_a {shape(a)} / lora_b {shape(b)} do not fit "
                             f"{prefix}weight {shape(weight)}; was it trained on another model?")


def meta_model(paths) -> tuple[Transformer, callable]:
    """A checkpoint (or a base with overlays, see stacked_source) as a Transformer on the meta device, checked
    against the stored tensors' names and shapes before anything is allocated, and tensor(name) to fill it
    (parallel.materialize): training builds, wraps and shards the model first, then each process reads its part."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("a model needs at least one checkpoint path")
    weights = [resolve(p) for p in paths]
    stored, tensor = stacked_source(weights)
    with torch.device("meta"):
        model = Transformer(native_args(weights[0]))
    check_state_dict(model, dict(stored), ", ".join(str(w) for w in weights))
    return model, tensor


def initial_adapters(model: nn.Module) -> dict:
    """The adapters apply_lora gives on a real device, for a model built on the meta device (whose LoRALinear
    are left uninitialised): A as nn.Linear initialises it, B zero, drawn on the CPU in module order from the
    global RNG, so every process draws the same full tensors whatever part it keeps."""
    adapters = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(m.lora_a.shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            adapters[f"{name}.lora_a"], adapters[f"{name}.lora_b"] = a, torch.zeros(m.lora_b.shape)
    return adapters


def fingerprints(paths) -> list[tuple[str, str]]:
    """(file, fingerprint) of each file a stack of --ckpt_paths reads: its weights, and the params.json and adapter
    config beside them. A fingerprint hashes the file's size, modification time and 16 sampled 64 KiB blocks:
    rewriting the file changes it, for 1 MiB of reads where hashing a whole 16 GB checkpoint would take minutes."""
    out = []
    for path in paths:
        weights = resolve(path).resolve()
        for f in (weights, weights.parent / "params.json", weights.parent / ADAPTER_CONFIG):
            if not f.is_file():
                continue
            stat = f.stat()
            h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                for i in range(16):
                    fh.seek(stat.st_size * i // 16)
                    h.update(fh.read(1 << 16))
            out.append((str(f), h.hexdigest()[:16]))
    return out


def weights_fingerprint(paths, dtype: torch.dtype) -> str:
    """One name for the weights a stack of --ckpt_paths gives in a compute dtype (DPO's reference cache key):
    rewriting a checkpoint changes it, so a cache made from the old weights is never reused."""
    return hashlib.sha256(json.dumps([str(dtype), fingerprints(paths)]).encode()).hexdigest()[:16]


def load_model(paths, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """A native dir (or a list: the base, then overlays applied in order, so base + SFT adapter + DPO
    adapter stacks as trained) as one Transformer with every adapter merged in; params.json from the base."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("load_model needs at least one checkpoint path")
    weights = [resolve(p) for p in paths]
    return Transformer.from_state_dict(native_args(weights[0]), stacked_state(weights),
                                       ", ".join(str(w) for w in weights), dtype, device)
