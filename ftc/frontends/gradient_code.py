"""Code in forward that changes gradients, which no frontend can keep: a custom
torch.autograd.Function, a gradient hook on a tensor (`h.register_hook(fn)`) and a backward pass
inside forward (`torch.autograd.grad`, `torch.autograd.backward`, `Tensor.backward`: a gradient
penalty).

Both tracers run a Function's forward and record the ops it does, not the Function: torch.fx
under the no_grad that `Function.apply` sets (the stage code would cut the gradient there), and
torch.export as plain differentiable ops (the stage code would compute autograd's gradient, not
the Function's backward). A tensor's hook is a Python callable on one run's tensor, which fx
drops as an op without users and export does not record. Either way the stages would train with
other gradients than the model, so the trace stops at the call and names it; a LEAF_MODULES
module that does it is kept whole by fx and runs as it is. A backward pass in forward differentiates
values that stage code would compute in other stages, or runs on the meta device node by node,
where autograd finds no graph between them (it stopped as an internal error before).

A module's backward hooks (`register_full_backward_hook`, `register_full_backward_pre_hook`,
`register_backward_hook`) run only where the stage code calls that module: fx keeps torch.nn's
layers and LEAF_MODULES whole and the stages adopt the module with its hooks, but a module traced
through (or lowered by export) becomes its ops, and its hooks are gone, silently (fx only warns
that the output is a Proxy).

A global hook on every module's call (`register_module_forward_hook` and its kin) is the
process's, not the model's, and no stage code can carry it: see global_hooks_refused.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path

import torch

from ftc.ir import FtcError, Graph
from ftc.runtime.model_file import ModelFile

from .common import TORCH_FILES, CodeFiles, callers, user_source

# Tensor methods that attach a gradient callable to one tensor.
GRADIENT_HOOKS = ("register_hook", "register_post_accumulate_grad_hook")

LEAF_FIX = (
    "do it inside a torch.nn.Module, list that module's class in LEAF_MODULES and compile with --frontend fx "
    "or auto: fx keeps a leaf module whole, so it runs as it is"
)


def hook_refused(model_file: ModelFile, method: str, where: str) -> FtcError:
    return FtcError(
        f"{model_file.path}: forward calls Tensor.{method} at {where}: the stage code cannot carry a gradient "
        "hook on a tensor (the tracers drop it, so the stages would compute other gradients than the model)",
        LEAF_FIX + "; or hook a module (register_full_backward_hook) or a parameter outside forward",
    )


# Functions that run autograd's backward inside forward, by the names a model calls them.
BACKWARD_CALLS = (("torch.autograd", torch.autograd, "grad"), ("torch.autograd", torch.autograd, "backward"),
                  ("Tensor", torch.Tensor, "backward"))  # fmt: skip


def backward_refused(model_file: ModelFile, name: str, where: str) -> FtcError:
    return FtcError(
        f"{model_file.path}: forward calls {name} at {where}: a backward pass inside forward (a gradient "
        "penalty, a physics-informed residual) cannot be split into stages (neither torch.fx nor torch.export "
        "keeps it as one op the stages could run)",
        LEAF_FIX,
    )


def _library_caller(frame, code: CodeFiles, model_file: ModelFile) -> tuple[str, str] | None:
    """(' (in Class at file:LINE)', a further fix) for the innermost caller outside torch when it
    is a library's code, not the model's (transformers' BloomGelu applies its GeLUFunction);
    None when the model's own code made the call."""
    frame = next(callers(frame, TORCH_FILES), None)
    if frame is None or code.own(frame.f_code.co_filename):
        return None
    owner = frame.f_locals.get("self")
    # a class of the model file's by the file's name (ibert.TracedQuantAct), not ftc's alias of it
    module = model_file.class_name(type(owner)) if isinstance(owner, torch.nn.Module) else ""
    at = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return (
        f" (in {module} at {at})" if module else f" (at {at})",
        f"; where fx cannot trace the library's model (transformers 5), replace {module or 'that code'} in "
        "build_model() with a module of torch ops that computes the same, whose gradients autograd makes",
    )


def _leaf_caller(frame, model_file: ModelFile) -> str | None:
    """The class of the innermost LEAF_MODULES module whose method is on the stack, if any: under
    export, which traces into such modules, the call was made inside one."""
    if not model_file.leaf_modules:
        return None
    owners = (frame.f_locals.get("self") for frame in callers(frame))
    return next((type(owner).__qualname__ for owner in owners if isinstance(owner, model_file.leaf_modules)), None)


@contextlib.contextmanager
def gradient_code_refused(model_file: ModelFile):
    """While tracing, calling a Function defined outside torch, or a tensor hook from the model
    file's code, raises an FtcError naming it."""
    base = torch.autograd.Function
    original_apply = base.__dict__["apply"]
    original_hooks = {method: getattr(torch.Tensor, method) for method in GRADIENT_HOOKS}
    code = CodeFiles(model_file)

    def refuse_function(cls, *args, **kwargs):
        if not cls.__module__.split(".")[0] == "torch":
            where = user_source(model_file) or model_file.path.name
            library = _library_caller(sys._getframe(1), code, model_file)
            leaf = _leaf_caller(sys._getframe(1), model_file)
            fix = (
                f"{leaf} is in LEAF_MODULES already, which torch.export traces into: compile with --frontend fx or "
                "auto, which keep it whole"
                if leaf
                else LEAF_FIX + (library[1] if library else "")
            )
            raise FtcError(
                f"{model_file.path}: forward calls the custom autograd.Function {cls.__qualname__} at {where}"
                f"{library[0] if library else ''}: neither torch.fx nor torch.export keeps its backward (they "
                "trace its forward's ops, so the stages would compute other gradients than the model)",
                fix,
            )
        return original_apply.__func__(cls, *args, **kwargs)

    def refuse_hook(method: str):
        original = original_hooks[method]

        def hook(self, *args, **kwargs):
            # torch's own code (a module's backward hooks) may hook tensors; the model's may not.
            if code.own(sys._getframe(1).f_code.co_filename):
                raise hook_refused(model_file, method, user_source(model_file) or model_file.path.name)
            return original(self, *args, **kwargs)

        return hook

    original_backward = {(owner, attr): getattr(owner, attr) for _, owner, attr in BACKWARD_CALLS}

    def refuse_backward(prefix: str, owner, attr: str):
        original = original_backward[(owner, attr)]

        def backward(*args, **kwargs):
            # torch's own code may run a backward while tracing; code outside torch may not.
            if not sys._getframe(1).f_code.co_filename.startswith(TORCH_FILES):
                where = user_source(model_file) or model_file.path.name
                raise backward_refused(model_file, f"{prefix}.{attr}", where)
            return original(*args, **kwargs)

        return backward

    base.apply = classmethod(refuse_function)
    for method in GRADIENT_HOOKS:
        setattr(torch.Tensor, method, refuse_hook(method))
    for prefix, owner, attr in BACKWARD_CALLS:
        setattr(owner, attr, refuse_backward(prefix, owner, attr))
    try:
        yield
    finally:
        base.apply = original_apply
        for method, original in original_hooks.items():
            setattr(torch.Tensor, method, original)
        for (owner, attr), original in original_backward.items():
            setattr(owner, attr, original)


def hook_name(hook) -> str:
    """'name (file.py:LINE)' of a hook callable, as far as Python can tell."""
    function = inspect.unwrap(getattr(hook, "func", hook))
    try:
        where = f" ({Path(inspect.getsourcefile(function)).name}:{inspect.getsourcelines(function)[1]})"
    except (TypeError, OSError):
        where = ""
    return f"{getattr(function, '__qualname__', type(function).__name__)}{where}"


def backward_hooks_kept(graph: Graph, model: torch.nn.Module, model_file: ModelFile) -> None:
    """Raise an FtcError naming the first module with backward hooks that the graph does not call
    whole (itself or a module holding it), so no stage would run its hooks."""
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    for path, module in model.named_modules(remove_duplicate=False):
        hooks = [*module._backward_pre_hooks.values(), *module._backward_hooks.values()]
        if not hooks or any(path == whole or path.startswith(whole + ".") for whole in called):
            continue
        module_name = f"{path or 'the model'} ({type(module).__qualname__})"
        if type(module).__module__.startswith("torch.nn."):
            fix = "compile with --frontend fx: it calls torch.nn's layers whole, so their hooks run"
        else:
            fix = (
                f"list {type(module).__qualname__} in LEAF_MODULES and compile with --frontend fx (fx calls it whole, so "
                "its hooks run), or hook a torch.nn layer inside it instead"
            )
        raise FtcError(
            f"{model_file.path}: module {module_name} has backward hooks ({', '.join(map(hook_name, hooks))}) but the "
            f"{graph.frontend} trace does not keep it whole: its ops go into the stage code, its hooks do not, so "
            "the stages would compute other gradients than the model",
            fix,
        )


# torch's hooks on every module's call, by the function that registers each kind.
GLOBAL_HOOKS = (
    ("register_module_forward_pre_hook", "_global_forward_pre_hooks", "register_forward_pre_hook"),
    ("register_module_forward_hook", "_global_forward_hooks", "register_forward_hook"),
    ("register_module_full_backward_pre_hook", "_global_backward_pre_hooks", "register_full_backward_pre_hook"),
    ("register_module_full_backward_hook", "_global_backward_hooks", "register_full_backward_hook"),
)


def global_hooks_refused(model_file: ModelFile) -> None:
    """Raise an FtcError naming a hook on every module's call (`torch.nn.modules.module.
    register_module_forward_hook` and its kin) that code outside torch registered, at the model
    file's import or in build_model(). It is state of the process, not of the model: the trace
    records it only inside the modules it goes into (fx not for the model itself), a layer the
    stage code calls whole runs it again wherever the process registered it (export's stages
    applied a scaling hook twice), and one registered in build_model() is registered again at every
    build."""
    registry = torch.nn.modules.module
    for register, table, per_module in GLOBAL_HOOKS:
        for hook in getattr(registry, table).values():
            if getattr(inspect.unwrap(hook), "__module__", "").split(".")[0] == "torch":
                continue  # torch's own (a ModuleTracker's while flops are counted)
            name = hook_name(hook)
            function = name.split(" (")[0]
            modules = "modules" if "forward" in register else "torch.nn layers or LEAF_MODULES classes (the stages call those whole)"
            raise FtcError(
                f"{model_file.path}: {register} registered the global hook {name}, which runs on every module's "
                "call: the stage code cannot carry it (a trace records it only inside the modules it goes into, and "
                "a process runs it again on every layer the stages call whole, as many times as it registered it), "
                "so the stages would compute other values than the model",
                f"register it on the {modules} it is for, in build_model() (`for module in model.modules(): "
                f"module.{per_module}({function})`), instead of globally",
            )
