"""CLIP weights from a local file, read without running anything in it, and from open_clip's hub cache,
found without waiting on a network that is not there.

Files (`--pretrained PATH`):
- safetensors: read by the safetensors library (no code by design);
- a torch.save state dict (zip or legacy): `torch.load(weights_only=True)`; a pickle that holds anything but
  tensors and plain containers is refused, never unpickled (it could run code);
- a TorchScript archive, the format of OpenAI's own `ViT-B-16.pt`: torch can only open these with
  `torch.jit.load`, which runs the archive's TorchScript (`__setstate__` methods) while loading. Here the
  archive's `data.pkl` is read by an unpickler that builds nothing but tensors and inert records of the
  module tree, so the weights come out and no code from the file runs. The module tree also says which
  activation the network was trained with: OpenAI's archives contain `QuickGELU` modules.

Tags (`--pretrained openai`): open_clip resolves each tag to a file on the Hugging Face hub. The local hub
cache (HF_HOME / HF_HUB_CACHE) is looked at first, without any network access; only when the file is not
there is the hub contacted, and only after a short reachability probe, so a machine without internet fails
in seconds with a message saying what to do instead of retrying for a minute. HF_HUB_OFFLINE=1 skips the
network altogether.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_cache.errors import UserError, first_line

NOT_CACHED = ("the weights are not in the local cache: pass --pretrained PATH, "
              "or download them once where the network is and set HF_HOME")
PROBE_TIMEOUT_S = 3.0

# TorchScript pickles name storages by their legacy typed-storage class.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# Pure data constructors TorchScript's pickler emits for typed lists (each returns its argument).
_TORCHSCRIPT_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                              "build_stringlist", "restore_type_tag"}


@dataclass
class Weights:
    """A checkpoint's tensors, and what the file itself says about the network's activation."""

    state_dict: dict[str, torch.Tensor]
    activation: str | None  # "quick_gelu" | "gelu" when the file records its modules (TorchScript), else None
    torchscript: bool  # a TorchScript module also holds tensors that are not weights (masks, sizes)


# ---- local files --------------------------------------------------------------------------------------

class TorchFileError(Exception):
    """A file `torch.load(weights_only=True)` refuses. `pickled`: the Python global it would have to build (a
    pickle of objects, which could run code), or None: not a file torch.save wrote, or a damaged one. `reason`:
    the part of torch's message that says what it met (its first lines only say that weights-only loading failed)."""

    def __init__(self, reason: str, pickled: str | None = None):
        super().__init__(reason)
        self.reason, self.pickled = reason, pickled


def load_torch_file(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, or `TorchFileError`. torch's warnings about the file's
    pickle (protocol 4 and the like) are held back: the data loaded, or the caller's one line, says what matters.
    Only the warnings of torch's weights-only unpickler are; anything else (open_clip's) still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            text = str(err)
            pickled = re.search(r"GLOBAL ([\w.]+)", text)
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
            raise TorchFileError(detail.group(1).strip() if detail else "not a torch.save pickle",
                                 pickled.group(1) if pickled else None) from None
        except Exception as err:  # torch raises several types for files that are not torch checkpoints at all
            raise TorchFileError(first_line(err, 120).split(". ")[0]) from None


def read_weights(path: str, flag: str = "--pretrained") -> Weights:
    """Read a checkpoint file's tensors on the CPU, running nothing from the file; one-line UserError otherwise."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return Weights(_state_dict_of(load_file(path, device="cpu"), flag, path), None, False)
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{flag} {path}: not a readable safetensors file ({first_line(err, 120)})") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return _read_torchscript(archive, flag, path)
    try:
        loaded = load_torch_file(path)
    except TorchFileError as err:
        if err.pickled:
            raise UserError(
                f"{flag} {path}: the file holds pickled Python objects ({err.pickled}), which dist-cache never "
                "unpickles (they can run code); re-save its state dict with torch.save or as safetensors where you "
                "trust it"
            ) from None
        raise UserError(f"{flag} {path}: not a weights file (torch cannot read it: {err.reason}); pass CLIP's weights: "
                        "a state dict from torch.save, an open_clip checkpoint, OpenAI's .pt archive or safetensors"
                        ) from None
    return Weights(_state_dict_of(loaded, flag, path), None, False)


def _state_dict_of(loaded: Any, flag: str, path: str) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside a loaded checkpoint: a bare state dict, or open_clip's training
    checkpoint (`{"state_dict": ...}`), with DataParallel's "module." prefix removed."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(f"{flag} {path}: not a state dict (a mapping of names to tensors); pass CLIP's weights")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


class _ScriptRecord:
    """An inert stand-in for one TorchScript object (a module): its class name and its attributes."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl into tensors and `_ScriptRecord`s; any other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, flag: str, path: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.flag, self.path = archive, prefix, flag, path
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptRecord,), {"qualified_name": qualified})
            return self.classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in _TORCHSCRIPT_LIST_BUILDERS:
            return lambda value, *_: value
        if module == "collections" and name == "OrderedDict":
            return dict
        raise UserError(
            f"{self.flag} {self.path}: the TorchScript archive refers to {module}.{name}, which a weights file "
            "does not need; convert it where you trust it: torch.save(torch.jit.load(PATH).state_dict(), NEW)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', dtype (from find_class), key, location, numel): the bytes are the record data/<key>.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise UserError(f"{self.flag} {self.path}: damaged TorchScript archive (storage reference {str(pid)[:60]})")
        _, dtype, key, _, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if flat.numel() != numel:
            raise UserError(f"{self.flag} {self.path}: damaged TorchScript archive (storage {key} is truncated)")
        return flat


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    # as_strided checks the view against the storage's bounds, so a hostile size cannot read past it.
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _read_torchscript(archive: zipfile.ZipFile, flag: str, path: str) -> Weights:
    names = archive.namelist()
    data_pkl = next(name for name in names if name.endswith("/data.pkl"))
    prefix = data_pkl[: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in names and archive.read(byteorder).strip() not in (b"", b"little"):
        raise UserError(f"{flag} {path}: a big-endian TorchScript archive; convert it on the machine that wrote it")
    unpickler = _TorchScriptUnpickler(archive.read(data_pkl), archive, prefix, flag, path)
    try:
        root = unpickler.load()
    except UserError:
        raise
    except Exception as err:  # a damaged pickle stream or tensor view
        raise UserError(f"{flag} {path}: damaged TorchScript archive ({first_line(err, 120)})") from None
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", state)
    if not state:
        raise UserError(f"{flag} {path}: the TorchScript archive holds no tensors; pass CLIP's weights")
    kinds = {cls.__name__ for cls in unpickler.classes.values()}
    activation = "quick_gelu" if "QuickGELU" in kinds else ("gelu" if "GELU" in kinds else None)
    return Weights(state, activation, True)


def _collect(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Every tensor attribute of the module tree, named as in a state dict ("visual.conv1.weight")."""
    attributes = getattr(node, "state", None)
    if not isinstance(attributes, dict):
        return
    for name, value in attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptRecord):
            _collect(value, f"{prefix}{name}.", out)


# ---- open_clip tags -----------------------------------------------------------------------------------

def tag_weights_file(pretrained_cfg: dict[str, Any]) -> str:
    """The local path of an open_clip tag's weights: from the hub cache if there, else downloaded if the hub is
    reachable."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, download_pretrained

    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a safetensors twin of a .bin/.pth file; so does this lookup.
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename[:-4] + ".safetensors"
            candidates.insert(0, twin)
        return _hub_file(repo, candidates, lambda: download_pretrained(pretrained_cfg), NOT_CACHED)
    url = pretrained_cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if url and cached.is_file():
        return str(cached)
    _check_online(url, NOT_CACHED)
    try:
        return download_pretrained(pretrained_cfg)
    except Exception as err:  # the server answered, but not with the file
        raise UserError(f"{NOT_CACHED} (download failed: {first_line(err, 120)})") from None


def timm_weights_file(name: str, tag: str) -> str:
    """The local path of a timm tag's weights (`timm:NAME --pretrained TAG`), found like an open_clip tag's."""
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
    if cfg is not None and cfg.hf_hub_id:
        candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]

        def download() -> str:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            for filename in candidates[:-1]:
                try:
                    return hf_hub_download(cfg.hf_hub_id, filename)
                except EntryNotFoundError:
                    continue
            return hf_hub_download(cfg.hf_hub_id, candidates[-1])

        return _hub_file(cfg.hf_hub_id, candidates, download, NOT_CACHED)
    if cfg is not None and cfg.url:
        return tag_weights_file({"url": cfg.url})
    raise UserError(f"--pretrained {tag}: timm names no file for {name}.{tag}; pass --pretrained PATH")


def text_tokenizer(open_clip: Any, name: str, config: dict[str, Any]) -> Any:
    """open_clip's tokenizer for model `name`. The bundled CLIP tokenizer needs nothing; a Hugging Face tokenizer
    (SigLIP's, SigLIP 2's) needs the transformers package and its files, which come from the hub cache, or from
    the hub when it is reachable: otherwise one line says what to do, in seconds."""
    hub = (config.get("text_cfg") or {}).get("hf_tokenizer_name")
    if hub:
        try:
            import transformers  # noqa: F401  (open_clip imports it itself; only its absence is checked here)
        except ImportError:
            raise UserError(f"{name}'s text tower uses the Hugging Face tokenizer {hub}, which needs the transformers "
                            "package: pip install 'dist-cache[hf-text]'") from None
        missing = (f"the tokenizer {hub} of {name} is not in the local cache: download it once where the network "
                   "is and set HF_HOME")
        _hub_file(hub, ["tokenizer_config.json"], lambda: "", missing)
    try:
        return open_clip.get_tokenizer(name)
    except ModuleNotFoundError as err:  # open_clip's SigLIP tokenizers, chosen by the model's name
        raise UserError(f"{name}'s text tower needs the {err.name} package for its tokenizer: pip install "
                        "'dist-cache[hf-text]'") from None
    except Exception as err:  # transformers and the hub fail in many ways
        raise UserError(f"{name}: cannot load its tokenizer ({first_line(err, 120)})") from None


def _hub_file(repo: str, candidates: list[str], download: Any, missing: str) -> str:
    """The first of `candidates` in the hub cache of `repo`; else `download()` once the hub is known to be
    reachable; else a one-line UserError starting with `missing`."""
    from huggingface_hub import constants, try_to_load_from_cache

    for name in candidates:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return cached
    if constants.is_offline_mode():
        raise UserError(f"{missing} (HF_HUB_OFFLINE is set)")
    _check_online(constants.ENDPOINT, missing)
    try:
        return download()
    except Exception as err:  # the hub answered, but not with the file
        raise UserError(f"{missing} (download failed: {first_line(err, 120)})") from None


def _check_online(endpoint: str, missing: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{missing} (HF_HUB_OFFLINE is set)")
    unreachable = _unreachable(endpoint)
    if unreachable:
        raise UserError(f"{missing} ({unreachable})")


def _unreachable(url: str) -> str | None:
    """Why `url`'s host (or the HTTPS proxy in use) cannot be connected to within a few seconds; None if it can.

    Run in a thread so a resolver that hangs cannot hold the command either.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot reach {host}:{port}: {first_line(err, 80)}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S + 1)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:.0f} s"
