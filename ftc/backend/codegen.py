"""Stage modules as Python source: IR nodes become one statement each, rendered through the
Jinja2 templates in templates/ and formatted with black.

The code reads like the model's own forward: operators as operators (`a + b`, `x[:, 0]`),
functions by their usual names (`F.gelu`, `torch.cat`), modules and parameters through
`self.<original path>`, and a comment naming the original module (and source lines) above each
block of statements that came from it.
"""

from __future__ import annotations

import builtins
import gc
import keyword
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import cache

import black
import jinja2
import torch

from ftc.interpreter import library_op
from ftc.ir import Graph, Node, Ref, TensorMeta, TorchExpr, meta_tensors, unique_name

from .plan import Adoption, StagePlan, module_children

BINARY = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "matmul": "@", "and_": "&", "or_": "|", "xor": "^", "lshift": "<<", "rshift": ">>",
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
}  # fmt: skip
UNARY = {"neg": "-", "pos": "+", "invert": "~", "not_": "not "}
# Names generated code uses itself; values with these names get a trailing underscore.
RESERVED = {"self", "torch", "F", "operator", "math", "device"}
CONTAINER_INDEXED = ("torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential")
CONTAINER_KEYED = ("torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ParameterDict")
PARAMETER_LIST = "torch.nn.modules.container.ParameterList"  # its keys are its positions
# The extremes of the float dtypes, which masks are filled with (transformers' torch.finfo(dtype).min),
# as a model writes them rather than as 17 digits (-3.4028234663852886e38); each is that very float.
FLOAT_LIMITS = {
    getattr(torch.finfo(dtype), end): f"torch.finfo(torch.{name}).{end}"
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64), ("bfloat16", torch.bfloat16))
    for end in ("min", "max")
}
# black takes about a millisecond a line; past this many characters of stage code (a GPT-2 XL
# pipeline has 200,000) the stage files are formatted in parallel, one process per core.
PARALLEL_FORMAT_CHARS = 100_000


@cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ftc.templates", "."),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def format_python(source: str) -> str:
    return black.format_str(source, mode=black.Mode())


def format_files(sources: list[str]) -> list[str]:
    """format_python over several files. The workers are forks of this process, which has
    black imported already; where fork is missing (Windows), one file after another."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, len(sources))
    small = sum(map(len, sources)) < PARALLEL_FORMAT_CHARS
    if workers < 2 or small or "fork" not in multiprocessing.get_all_start_methods():
        return [format_python(source) for source in sources]
    # A worker's garbage collections would scan, and so copy, every page of the compiler's
    # objects it shares with this process; frozen objects are left alone (see gc.freeze).
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(format_python, sources))
    finally:
        if freeze:
            gc.unfreeze()


def variable(name: str) -> str:
    if name in RESERVED or keyword.iskeyword(name) or hasattr(builtins, name):
        return name + "_"
    return name


def shape_text(meta: TensorMeta, batch_size: int) -> str:
    dims = []
    for d, size in enumerate(meta.shape):
        if (d == meta.batch_dim or d in meta.other_batch_dims) and size % batch_size == 0:
            per_sample = size // batch_size
            dims.append("B" if per_sample == 1 else f"B*{per_sample}")
        else:
            dims.append(str(size))
    return f"{meta.dtype}[{', '.join(dims)}]"


def value_text(meta, batch_size: int) -> str:
    """How the docstring describes a value: "float32[B, 64, 128]", "int", ..."""
    if isinstance(meta, TensorMeta):
        return shape_text(meta, batch_size)
    tensors = meta_tensors(meta)
    if tensors:
        return f"({', '.join(shape_text(t, batch_size) for t in tensors)})"
    return getattr(meta, "type", "value")


class StageWriter:
    """Renders one stage; holds what the stage's statements need to name things."""

    def __init__(self, graph: Graph, plan: StagePlan, crossing: set[str]):
        self.graph = graph
        self.plan = plan
        self.by_name = graph.by_name()
        self.imports: set[str] = set()
        self.adopted_kind = self._adopted_kinds(plan.adopted)
        # A submodule's position among its parent's children. A sliced Sequential keeps its keys
        # (`backbone()[2:]` holds "2", "3", ...), so a digit key need not be its index.
        self.position = {path: k for paths in module_children(graph).values() for k, path in enumerate(paths)}
        self.read = {name for node in plan.nodes for name in node.refs()} | set(plan.outputs)
        self.local = self._local_names(crossing)

    # -- naming --------------------------------------------------------------------------

    def _local_names(self, crossing: set[str]) -> dict[str, str]:
        """Variable names: values that cross stages keep their pipeline-wide names (those in
        pipeline.json); values that live and die inside the stage are named after their label,
        numbered within the stage only ("q", not "q_4" because three blocks came before)."""
        local = {name: variable(name) for name in (*self.plan.inputs, *self.plan.outputs)}
        taken = {variable(name) for name in crossing} | RESERVED
        for node in self.plan.nodes:
            if node.name in local:
                continue
            written = node.args[0] if _assigns_an_index(node) else None
            if isinstance(written, Ref) and written.name in local:
                local[node.name] = local[written.name]  # `h[mask] = 0.0` leaves h, written, as h
                continue
            local[node.name] = unique_name(variable(node.label or node.name), taken)
        return local

    def _adopted_kinds(self, entries: list[Adoption]) -> dict[str, str]:
        kinds = {}
        for entry in entries:
            kinds[entry.path] = entry.kind
            kinds.update(self._adopted_kinds(entry.children))
        return kinds

    def access(self, path: str) -> str:
        """`self.<...>` for an original module or tensor path, as the stage holds it."""
        expr, prefix, container_ours = "self", "", True
        for part in path.split("."):
            full = f"{prefix}.{part}" if prefix else part
            if container_ours:
                if part.isidentifier() and not keyword.iskeyword(part):
                    expr += f".{part}"
                elif expr == "self" or full in self.graph.state:
                    # the stage is a plain Module; a tensor in our ModuleDict is an attribute
                    expr = f"getattr({expr}, {part!r})"
                else:  # a submodule of our ModuleDict
                    expr = f"{expr}[{part!r}]"
            else:
                parent_class = self.graph.modules.get(prefix, "")
                if parent_class in CONTAINER_INDEXED and part.isdigit() and self.position[full] == int(part):
                    expr += f"[{part}]"
                elif parent_class == PARAMETER_LIST and part.isdigit():
                    expr += f"[{part}]"
                elif parent_class in CONTAINER_KEYED:
                    expr += f"[{part!r}]"
                elif part.isidentifier() and not keyword.iskeyword(part):
                    expr += f".{part}"
                else:
                    expr = f"getattr({expr}, {part!r})"
            container_ours = container_ours and self.adopted_kind.get(full) == "container"
            prefix = full
        return expr

    def ref(self, name: str) -> str:
        source = self.by_name[name]
        if source.op == "get_attr":
            if source.target in self.graph.constants:
                return f"self.{source.target}"
            return self.access(source.target)
        return self.local[name]

    # -- arguments -----------------------------------------------------------------------

    def arg(self, value) -> str:
        if isinstance(value, Ref):
            return self.ref(value.name)
        if isinstance(value, TorchExpr):
            if value.expr.startswith("F."):
                self.imports.add("F")
            return value.expr
        if isinstance(value, float):
            if math.isnan(value):
                return 'float("nan")'
            if math.isinf(value):
                return 'float("inf")' if value > 0 else 'float("-inf")'
            return FLOAT_LIMITS.get(value, repr(value))
        if value is Ellipsis:
            return "..."
        if isinstance(value, tuple):
            items = ", ".join(self.arg(v) for v in value)
            return f"({items},)" if len(value) == 1 else f"({items})"
        if isinstance(value, list):
            return f"[{', '.join(self.arg(v) for v in value)}]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self.arg(v)}" for k, v in value.items()) + "}"
        if isinstance(value, slice):
            return f"slice({self.arg(value.start)}, {self.arg(value.stop)}, {self.arg(value.step)})"
        return repr(value)

    def index(self, value) -> str:
        """A subscript as Python writes it: x[1:, ..., None]."""
        if isinstance(value, slice):
            start = "" if value.start is None else self.arg(value.start)
            stop = "" if value.stop is None else self.arg(value.stop)
            step = "" if value.step is None else f":{self.arg(value.step)}"
            return f"{start}:{stop}{step}"
        if isinstance(value, tuple) and value:
            return ", ".join(self.index(v) for v in value) + ("," if len(value) == 1 else "")
        return self.arg(value)

    def call_args(self, node: Node, skip: int = 0) -> str:
        args = [self.arg(a) for a in node.args[skip:]]
        args += [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()]
        return ", ".join(args)

    # -- statements ----------------------------------------------------------------------

    def expression(self, node: Node) -> str:
        if node.op == "call_module":
            return f"{self.access(node.target)}({self.call_args(node)})"
        if node.op == "call_method":
            return f"{self.arg(node.args[0])}.{node.target}({self.call_args(node, skip=1)})"
        target = node.target
        head, _, short = target.partition(".")
        if head == "operator" and not node.kwargs:
            if short in BINARY and len(node.args) == 2:
                return f"{self.arg(node.args[0])} {BINARY[short]} {self.arg(node.args[1])}"
            if short in UNARY and len(node.args) == 1:
                return f"{UNARY[short]}{self.arg(node.args[0])}"
            if short == "getitem" and len(node.args) == 2:
                return f"{self.arg(node.args[0])}[{self.index(node.args[1])}]"
        if target == "getattr" and len(node.args) == 2 and isinstance(node.args[1], str) and node.args[1].isidentifier():
            return f"{self.arg(node.args[0])}.{node.args[1]}"
        if head in ("F", "operator", "math"):
            self.imports.add(head)
        return f"{target}({self.call_args(node)})"

    def statement(self, node: Node) -> str:
        if _assigns_an_index(node):
            # `h[mask] = 0.0`: the value is the tensor written, under its own name where the stage
            # names it anew (a value another stage reads keeps its pipeline-wide name)
            written, index, value = node.args
            line = f"{self.arg(written)}[{self.index(index)}] = {self.arg(value)}"
            if node.name in self.read and self.local[node.name] != self.arg(written):
                line += f"\n{self.local[node.name]} = {self.arg(written)}"
            return line
        expression = self.expression(node)
        if node.name not in self.read:  # kept for its side effect, such as an in-place update
            return expression
        return f"{self.local[node.name]} = {expression}"

    def blocks(self) -> list[dict]:
        """Statements grouped by the original module they came from, in program order."""
        groups: list[dict] = []
        nodes = self.plan.nodes
        for k, node in enumerate(nodes):
            module_path, module_class = node.module_path, node.module_class
            if _inside_a_block(node, nodes[k - 1] if k else None, nodes[k + 1] if k + 1 < len(nodes) else None):
                module_path, module_class = nodes[k - 1].module_path, nodes[k - 1].module_class
            if not groups or groups[-1]["module_path"] != module_path:
                groups.append({"module_path": module_path, "module_class": module_class, "lines": [], "sources": [], "no_grad": False})
            group = groups[-1]
            if not node.grad_enabled and not group["no_grad"]:
                group["lines"].append("with torch.no_grad():")
            group["no_grad"] = not node.grad_enabled
            indent = "    " if group["no_grad"] else ""
            group["lines"].extend(indent + line for line in self.statement(node).split("\n"))
            if node.source:
                groups[-1]["sources"].append(node.source)
        for group in groups:
            group["comment"] = _block_comment(group)
        return groups

    def init_lines(self) -> list[str]:
        lines: list[str] = []

        def emit(entries: list[Adoption], owner: str) -> None:
            for entry in entries:
                name = entry.path.rpartition(".")[2]
                plain = name.isidentifier() and not keyword.iskeyword(name)
                target = f"{owner}.{name}" if plain else f"{owner}[{name!r}]"
                if entry.kind in ("container", "module"):
                    value = "torch.nn.ModuleDict()" if entry.kind == "container" else f"model.get_submodule({entry.path!r})"
                    if plain or owner != "self":
                        lines.append(f"{target} = {value}")
                    else:  # a plain Module takes names such as "0" only through add_module
                        lines.append(f"self.add_module({name!r}, {value})")
                        target = f"getattr(self, {name!r})"
                    if entry.kind == "container":
                        emit(entry.children, target)
                elif entry.kind == "parameter":
                    if plain:
                        lines.append(f"{target} = model.get_parameter({entry.path!r})")
                    else:
                        lines.append(f"{owner}.register_parameter({name!r}, model.get_parameter({entry.path!r}))")
                else:
                    persistent = "" if entry.persistent else ", persistent=False"
                    lines.append(f"{owner}.register_buffer({name!r}, model.get_buffer({entry.path!r}){persistent})")

        emit(self.plan.adopted, "self")
        if self.device_line() and not self.tensor_input():
            lines.append('self.register_buffer("device_anchor", torch.empty(0), persistent=False)')
        for name in self.plan.constants:
            constant = self.graph.constants[name]
            lines.append(
                f"self.register_buffer({name!r}, torch.tensor({constant.data!r}, dtype=torch.{constant.dtype}), persistent=False)"
            )
        return lines

    def device_line(self) -> str | None:
        """`device = <input>.device` when a statement creates tensors on the stage's device; a
        stage that receives no tensor asks an empty buffer that moves with the stage."""
        if not any(_uses_stage_device((n.args, n.kwargs)) for n in self.plan.nodes):
            return None
        source = self.tensor_input()
        return f"device = {self.local[source]}.device" if source else "device = self.device_anchor.device"

    def tensor_input(self) -> str | None:
        return next((n for n in self.plan.inputs if isinstance(self.by_name[n].meta, TensorMeta)), None)

    def library_ops(self) -> list[str]:
        """The custom operators the stage calls (`torch.ops.mylib.scaled_tanh`): torch knows them
        only once the code that registers them (torch.library) has run, the model file or a
        library it imports, so the docstring names them for whoever runs the stage by hand."""
        ops = {library_op(node.target) for node in self.plan.nodes if node.op == "call_function"}
        return sorted(f"torch.ops.{op.replace('::', '.')}" for op in ops if op)

    def source(self, model_file: str) -> str:
        """The stage module before black formats it."""
        blocks = self.blocks()
        init_lines = self.init_lines()
        device_line = self.device_line()
        source = _templates().get_template("stage.py.j2").render(
            index=self.plan.index,
            graph_name=self.graph.name,
            model_file=model_file,
            num_stages=self.graph.num_stages,
            device=self.plan.device,
            summary=_stage_summary(self.graph, self.plan),
            library_ops=self.library_ops(),
            inputs=[(self.local[n], value_text(self.by_name[n].meta, self.graph.batch_size)) for n in self.plan.inputs],
            outputs=[(self.local[n], value_text(self.by_name[n].meta, self.graph.batch_size)) for n in self.plan.outputs],
            stdlib_imports=sorted(self.imports - {"torch", "F"}),
            uses_functional="F" in self.imports,
            init_lines=init_lines,
            device_line=device_line,
            blocks=blocks,
            returns=[self.ref(n) for n in self.plan.outputs],
        )
        return source


def _assigns_an_index(node: Node) -> bool:
    """`x[index] = value` in place on the tensor x (export's index_put_), whose value is x."""
    return node.op == "call_function" and node.target == "operator.setitem" and node.mutates == 0 \
        and len(node.args) == 3 and not node.kwargs and isinstance(node.meta, TensorMeta)  # fmt: skip


def _inside_a_block(node: Node, before: Node | None, after: Node | None) -> bool:
    """Whether `node`, a statement of no line of the model's (a size the stage takes off its
    own tensor, `batch = h.size(0)`, just before the first statement that reads it), sits
    between two statements of one module inside its own, and so belongs to their block: under
    a comment of its own ("# GPT") it split an attention block in two."""
    if node.source or before is None or after is None or before.module_path != after.module_path:
        return False
    inner = before.module_path
    return inner != node.module_path and (not node.module_path or inner.startswith(f"{node.module_path}."))


def _uses_stage_device(value) -> bool:
    if isinstance(value, TorchExpr):
        return value.expr == "device"
    if isinstance(value, (tuple, list)):
        return any(_uses_stage_device(v) for v in value)
    if isinstance(value, dict):
        return any(_uses_stage_device(v) for v in value.values())
    return False


def _block_comment(group: dict) -> str:
    """'blocks.0.attn (CausalSelfAttention), gpt.py:31-37'; the root module by its class alone."""
    cls = group["module_class"].rpartition(".")[2]
    path = group["module_path"]
    text = f"{path} ({cls})" if path and cls else path or cls or "model"
    lines = sorted({int(s.rpartition(":")[2]) for s in group["sources"] if s.rpartition(":")[2].isdigit()})
    files = {s.rpartition(":")[0] for s in group["sources"]}
    if lines and len(files) == 1:
        (file,) = files
        text += f", {file}:{lines[0]}" if len(lines) == 1 else f", {file}:{lines[0]}-{lines[-1]}"
    return text


def _stage_summary(graph: Graph, plan: StagePlan) -> str:
    """The first and last original modules the stage runs ("wte .. blocks.1"): two levels deep,
    or down to the first item of a ModuleList or Sequential on the way, which tells the blocks
    apart where a wrapper holds them ("transformer.h.0", not "transformer.h", in GPT-2)."""
    paths = []
    for node in plan.nodes:
        path = node.target if node.op == "call_module" else node.module_path
        parts = path.split(".")
        depth = next((k for k in range(1, len(parts)) if graph.modules.get(".".join(parts[:k])) in CONTAINER_INDEXED), 1)
        top = ".".join(parts[: max(2, depth + 1)])
        if top and top not in paths:
            paths.append(top)
    if not paths:
        return "top-level ops"
    return paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"


def render_stages(graph: Graph, plans: list[StagePlan], model_file: str) -> list[str]:
    """Every stage's module, in plan order."""
    crossing = {name for plan in plans for name in (*plan.inputs, *plan.outputs)}
    return format_files([StageWriter(graph, plan, crossing).source(model_file) for plan in plans])


def render_package_init(graph: Graph, plans: list[StagePlan]) -> str:
    source = _templates().get_template("package_init.py.j2").render(
        graph_name=graph.name, stages=[plan.index for plan in plans]
    )
    return format_python(source)
