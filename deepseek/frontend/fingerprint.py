"""A hash of everything a trace of an nn.Module could depend on, taken without tracing.

The capture cache's first key (``capture_cache.model_key``): it lets a warm ``ds.compile``
skip ``torch.export`` itself, which is most of a warm start (on a 2-core CPU, ResNet-50:
2.1 s of trace plus 2.7 s importing torch._dynamo, of a 4.8 s compile). What it hashes:

- each submodule's path, class and instance state (every ``__dict__`` entry: numbers,
  strings, containers, dtypes, functions, config objects' own ``__dict__``, plain tensors
  by value); its forward hooks make a model unkeyable;
- every class in the tree (not PyTorch's own: the torch version covers those): the
  bytecode of its methods, its class attributes, and, through the names that bytecode
  reads from its module's globals, the bytecode of the helper functions it calls, the
  classes it names and the numbers and strings it reads;
- the size and modification time of the source files, as Python's own bytecode cache
  checks them: of every module whose classes or functions it met, and of every Python
  file of the user packages among them (``__main__``, a package on ``sys.path`` or
  installed editable: an edited helper in another file misses), and the version of
  each installed library package (an in-place edit of an installed library's file the
  model's classes do not live in is not seen);
- each parameter and buffer's name, shape, dtype and device, the values of small ones and
  of non-persistent buffers (anything a trace might read as a number);
- each input leaf's shape, dtype and device (or value), the default dtype, grad and
  autocast modes, and the torch and Python versions.

What it cannot see (a global flag of another module flipped at run time, an environment
variable read inside forward) is why ``DEEPSEEK_CAPTURE_CACHE=traced`` keys captures by
the exported program only. An object it does not know how to hash raises ``Unkeyable``:
such a model is traced every time, never guessed at.
"""

from __future__ import annotations

import collections
import enum
import functools
import hashlib
import marshal
import os
import site
import sys
import sysconfig
import types

import torch
import torch.nn.modules.module as _module_mod

_LIMIT = 1 << 24  # plain tensors hashed by value up to this many bytes
_DEPTH = 8  # nesting of config objects followed before giving up
_PRIMITIVE = (type(None), bool, int, float, complex, str, bytes)
_TORCH_VALUES = (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)
_BASE_STATE = frozenset(torch.nn.Module().__dict__)
# attributes that are a hash of the object's other attributes, salted per process
# (transformers' GenerationConfig): those attributes are hashed instead
_UNHASHED = frozenset({"_original_object_hash"})
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks")


class Unkeyable(Exception):
    """The model holds something the fingerprint cannot hash; capture traces it."""


def _is_torch(module_name: str | None) -> bool:
    return bool(module_name) and (module_name == "torch" or module_name.startswith("torch."))


class _Hasher:
    def __init__(self):
        self._h = hashlib.sha256()
        self._done: set[int] = set()  # ids of the classes and functions queued
        self._queue: collections.deque = collections.deque()
        self._modules: set[str] = set()  # modules whose code the model runs (user, library)
        self._paths: dict[int, str] = {}  # id(module) -> its path in the tree
        self._stack: set[int] = set()
        self._shallow = False  # inside a library class's attributes

    def add(self, *parts) -> None:
        for p in parts:
            self._h.update(repr(p).encode())
            self._h.update(b"\0")

    def digest(self) -> str:
        self._drain()
        self._add_package_files()
        return self._h.hexdigest()

    # -- the module tree -------------------------------------------------------------
    def model(self, model: torch.nn.Module) -> None:
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                     "_global_backward_hooks", "_global_backward_pre_hooks"):
            if getattr(_module_mod, name, None):
                raise Unkeyable(f"global module hooks ({name})")
        tree = list(model.named_modules(remove_duplicate=False))
        for path, m in tree:
            self._paths.setdefault(id(m), path)
        for path, m in tree:
            if any(getattr(m, h, None) for h in _FORWARD_HOOKS):
                raise Unkeyable(f"module {path or type(m).__name__!r} has hooks")
            self.add("module", path)
            self.cls(type(m))
            for k in sorted(m.__dict__):
                if k in _BASE_STATE and k not in ("training", "_non_persistent_buffers_set"):
                    continue
                self.add(k)
                self.value(m.__dict__[k], strict=True, depth=0)
            for k in sorted(m._non_persistent_buffers_set):
                b = m._buffers.get(k)
                self.add("non-persistent", k)
                self.value(b, strict=True, depth=0)
        for name, t in model.state_dict(keep_vars=True).items():
            self.add("state", name, tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)
            if t.numel() <= 64:
                self._tensor_bytes(t)

    # -- values ----------------------------------------------------------------------
    def value(self, v, strict: bool, depth: int) -> None:
        """Hash ``v``. ``strict``: an unknown object is Unkeyable (module state); otherwise
        only its type is hashed (globals and class attributes the bytecode names)."""
        if isinstance(v, _PRIMITIVE):
            self.add(type(v).__name__, v)
        elif isinstance(v, _TORCH_VALUES) or isinstance(v, enum.Enum):
            self.add(type(v).__name__, str(v))
        elif isinstance(v, torch.Tensor):
            self.add("tensor", tuple(v.shape), str(v.dtype), str(v.device))
            self._tensor_bytes(v)
        elif isinstance(v, torch.nn.Module):
            if id(v) not in self._paths:
                raise Unkeyable(f"a {type(v).__name__} held outside the module tree")
            self.add("module-ref", self._paths[id(v)])
        elif isinstance(v, (tuple, list, set, frozenset, dict)):
            self._container(v, strict, depth)
        elif isinstance(v, type):
            self.cls(v)
        elif isinstance(v, types.FunctionType):
            self.function(v)
        elif isinstance(v, types.MethodType):
            self.add("method")
            self.value(v.__self__, strict, depth + 1)
            self.function(v.__func__)
        elif isinstance(v, functools.partial):
            self.add("partial")
            for part in (v.func, v.args, v.keywords):
                self.value(part, strict, depth + 1)
        elif isinstance(v, types.ModuleType):
            self.add("pymodule", v.__name__)
            self._note_module(v.__name__)
        elif isinstance(v, (types.BuiltinFunctionType, torch._ops.OpOverload,
                            torch._ops.OpOverloadPacket)) or _is_torch(
                                getattr(v, "__module__", None)) and callable(v):
            self.add("builtin", getattr(v, "__module__", None),
                     getattr(v, "__qualname__", None) or str(v))
        elif strict:
            self._object(v, depth)
        else:
            self.add("object", type(v).__module__, type(v).__qualname__)

    def _container(self, v, strict: bool, depth: int) -> None:
        if id(v) in self._stack:
            self.add("cycle")
            return
        if depth > _DEPTH:
            raise Unkeyable(f"state nested deeper than {_DEPTH}")
        self._stack.add(id(v))
        try:
            self.add(type(v).__name__, len(v))
            if isinstance(v, dict):
                items = sorted(v.items(), key=lambda kv: repr(kv[0]))
                for k, x in items:
                    self.value(k, strict, depth + 1)
                    self.value(x, strict, depth + 1)
            elif isinstance(v, (set, frozenset)):
                for x in sorted(v, key=repr):
                    self.value(x, strict, depth + 1)
            else:
                for x in v:
                    self.value(x, strict, depth + 1)
        finally:
            self._stack.discard(id(v))

    def _object(self, v, depth: int) -> None:
        """A config-like object in module state: its class and its own ``__dict__``."""
        state = getattr(v, "__dict__", None)
        if state is None or _is_torch(type(v).__module__):
            raise Unkeyable(f"module state holds a {type(v).__module__}.{type(v).__qualname__}")
        if id(v) in self._stack:
            self.add("cycle")
            return
        if depth > _DEPTH:
            raise Unkeyable(f"state nested deeper than {_DEPTH}")
        self.add("object")
        self.cls(type(v))
        self._stack.add(id(v))
        try:
            for k in sorted(state):
                if k in _UNHASHED:
                    continue
                self.add(k)
                self.value(state[k], True, depth + 1)
        finally:
            self._stack.discard(id(v))

    def _tensor_bytes(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.is_meta or t.layout != torch.strided or t.is_quantized:
            raise Unkeyable(f"a {t.layout} {t.dtype} tensor")
        if t.numel() * t.element_size() > _LIMIT:
            raise Unkeyable(f"a plain tensor of {t.numel() * t.element_size()} bytes")
        self._h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    # -- code --------------------------------------------------------------------------
    def cls(self, c: type) -> None:
        self.add("class", c.__module__, c.__qualname__)
        where = _where(c.__module__)
        if where in ("user", "library") and not self._shallow and id(c) not in self._done:
            self._done.add(id(c))
            self._queue.append(c)

    def function(self, f: types.FunctionType) -> None:
        self.add("function", f.__module__, f.__qualname__)
        where = _where(f.__module__)
        if where == "library":
            self._note_module(f.__module__)  # its file's size and time cover its code
        elif where == "user" and id(f) not in self._done:
            self._done.add(id(f))
            self._queue.append(f)

    def _drain(self) -> None:
        """Hash the classes and functions met so far, and those they name in turn (a
        queue, not recursion: a call graph can be deep)."""
        while self._queue:
            x = self._queue.popleft()
            if isinstance(x, type):
                self._class_body(x)
            else:
                self._function_body(x)

    def _class_body(self, c: type) -> None:
        """The class's attributes along its MRO. A library class's own code is covered by
        its file's size and time: there only the attributes are hashed (a method patched
        in from user code is followed), and classes they name are not followed."""
        self.add("class-body", c.__module__, c.__qualname__)
        for base in c.__mro__:
            where = _where(base.__module__)
            if where not in ("user", "library"):
                continue
            self._note_module(base.__module__)
            self.add("base", base.__module__, base.__qualname__)
            self._shallow = where == "library"
            try:
                for k in sorted(vars(base)):
                    if k.startswith("__") and k.endswith("__") and k != "__call__":
                        continue
                    attr = vars(base)[k]
                    self.add(k)
                    if isinstance(attr, (staticmethod, classmethod)):
                        attr = attr.__func__
                    if isinstance(attr, property):
                        for f in (attr.fget, attr.fset):
                            if f is not None:
                                self.value(f, False, 0)
                    else:
                        self.value(attr, False, 0)
            finally:
                self._shallow = False

    def _function_body(self, f: types.FunctionType) -> None:
        """A user function: its bytecode, defaults, closure and the globals it names."""
        self.add("function-body", f.__module__, f.__qualname__)
        self._note_module(f.__module__)
        self._h.update(marshal.dumps(f.__code__))
        for part in (f.__defaults__, f.__kwdefaults__):
            self.value(part, False, 0)
        for cell in f.__closure__ or ():
            try:
                self.value(cell.cell_contents, False, 0)
            except ValueError:  # an empty cell
                self.add("empty-cell")
        for name in sorted(_names(f.__code__)):
            if name in f.__globals__:
                self.add("global", name)
                self.value(f.__globals__[name], False, 0)

    # -- source files ----------------------------------------------------------------
    def _note_module(self, name: str | None) -> None:
        if name and _where(name) in ("user", "library"):
            self._modules.add(name)

    def _add_package_files(self) -> None:
        """The source files' sizes and times: of each module noted; of every Python file of
        each user package they belong to (the files a user edits: a helper module the
        model calls through an attribute is covered too); each library package's version.
        The set does not depend on which modules happen to be imported yet."""
        files: dict[str, str] = {}
        for name in self._modules:
            path = getattr(sys.modules.get(name), "__file__", None)
            if path:
                files[name] = path
        for pkg in sorted({name.split(".")[0] for name in self._modules}):
            top = sys.modules.get(pkg)
            if _where(pkg) == "library":
                self.add("package", pkg, getattr(top, "__version__", None))
                continue
            for root in getattr(top, "__path__", None) or ():
                for where, dirs, names in os.walk(root):
                    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
                    for f in names:
                        if f.endswith(".py"):
                            files[os.path.join(where, f)] = os.path.join(where, f)
        for key in sorted(files):
            try:
                st = os.stat(files[key])
                self.add("file", key, st.st_size, st.st_mtime_ns)
            except OSError:
                self.add("file", key, None)


@functools.lru_cache(maxsize=None)
def _prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    paths = sysconfig.get_paths()
    libs = {paths.get("purelib"), paths.get("platlib"), site.getusersitepackages()}
    libs.update(getattr(site, "getsitepackages", lambda: [])())
    std = {paths.get("stdlib"), paths.get("platstdlib")}

    def norm(ps) -> tuple[str, ...]:
        return tuple(sorted(os.path.join(os.path.realpath(p), "") for p in ps if p))
    return norm(libs), norm(std)


@functools.lru_cache(maxsize=None)
def _where(module_name: str | None) -> str:
    """"torch", "stdlib", "library" (installed in site-packages) or "user" (anything else:
    ``__main__``, a notebook, a package on ``sys.path`` or installed editable)."""
    if not module_name or _is_torch(module_name):
        return "torch" if module_name else "stdlib"
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return "user" if module_name == "__main__" else "stdlib"
    path = os.path.realpath(path)
    libs, std = _prefixes()
    if path.startswith(libs):
        return "library"
    return "stdlib" if path.startswith(std) else "user"


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name the bytecode (nested functions included) reads."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def fingerprint(model: torch.nn.Module, inputs: list, extra: object) -> str:
    """The hash of ``model`` (in its current mode), the flattened ``inputs`` and ``extra``
    (the capture's other arguments); raises ``Unkeyable``."""
    from deepseek import __version__

    h = _Hasher()
    h.add("deepseek-model-key-1", torch.__version__, sys.version, __version__, extra)
    h.add(str(torch.get_default_dtype()), torch.is_grad_enabled(),
          torch.is_inference_mode_enabled())
    for device in ("cpu", "cuda"):
        try:
            h.add(device, torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device)))
        except (AttributeError, RuntimeError, TypeError):
            h.add(device, "autocast unknown")
    for x in inputs:
        if isinstance(x, torch.Tensor):
            h.add("input", tuple(x.shape), str(x.dtype), str(x.device), x.requires_grad,
                  x.layout)
        else:
            h.value(x, True, 0)
    h.model(model)
    return h.digest()
