"""Name values after the variables the model's source assigns them to.

Sets each compute node's `label` (what the value is called, as stage code names it locally)
and renames nodes to unique versions of their labels where the source gave a better name.


Tracers name values after the op that made them (`add_3`, `getitem_7`). The model's author had
better names: in `q, k, v = self.qkv(x).split(WIDTH, dim=2)` the three items are q, k and v,
and in `scores = (q @ k.transpose(-2, -1)) * scale` the last op's value is `scores`. This pass
reads the statement each node came from (the node's `source`, file:line, parsed with ast) and
gives the statement's assigned names to the values the statement produced, so the stage code
reads like the original forward.

Nodes group by (module path, statement) in program order; in a group, the last node's value is
what a simple `name = ...` assigns (a statement that a loop runs again, `h = h + block(h)`,
splits into its runs, each of whose values is `h`), and the items unpacked from a tuple
(getitem nodes) take the names of a tuple target. A function of the model's code the tracer went into (a Block's
forward) ends in `return <expr>`, which names nothing; its value takes the name the caller
assigns it (`x = block(x)`), read from the node's `callers` (the lines that called, frame by
frame, the function its source is in), through callers that return it in turn. The ops of a torch.nn layer the tracer went into (export's
Transformer layers) carry their caller's line one level deeper: where such a layer ends the
statement, its last op is the statement's value. Statements the pass cannot see (a file it
cannot find, a multi-statement line) leave names as they are.

Sources name the model's code wherever it is (ftc/frontends/common.py CodeFiles): a file in the
model file's folder by its path there, a library's (the files that define the model's module
classes: transformers' modeling_gpt2.py) by its path below its sys.path entry,
"transformers/models/gpt2/modeling_gpt2.py:187", which `locate` finds again. A layer of the
model's code without submodules (transformers' Conv1D) names its value after its attribute, as
a torch.nn layer's call does.
"""

from __future__ import annotations

import ast
import keyword
import re
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath

from ftc.ir import Graph, Node, Ref, arg_refs, unique_name


def _statements(path: Path) -> dict[int, ast.stmt]:
    """Line -> the innermost simple statement that covers it."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    by_line: dict[int, ast.stmt] = {}
    for stmt in ast.walk(tree):
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Expr)):
            for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
                by_line[line] = stmt
    return by_line


def locate(file: str, source_dir: Path) -> Path | None:
    """The file a node's source names: one in the model's folder (`source_dir`), or an imported
    module's, by its path below the sys.path entry it was imported from
    ("transformers/models/gpt2/modeling_gpt2.py"): the loaded module's own file, else the
    first sys.path entry that holds it."""
    relative = PurePosixPath(file)
    if relative.is_absolute() or ".." in relative.parts or relative.suffix != ".py":
        return None
    if (source_dir / relative).is_file():
        return source_dir / relative
    parts = relative.with_suffix("").parts
    module = sys.modules.get(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    loaded = getattr(module, "__file__", None)
    if loaded and Path(loaded).as_posix().endswith(f"/{file}") and Path(loaded).is_file():
        return Path(loaded)
    for entry in sys.path:
        candidate = Path(entry or ".") / relative
        if candidate.is_file():
            return candidate
    return None


def _targets(stmt: ast.stmt) -> str | list | None:
    """What a statement assigns to: a name, or (nested) lists of names for tuple targets."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
        target = stmt.target
    else:
        return None
    return _names(target)


def _names(target: ast.expr) -> str | list | None:
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, (ast.Tuple, ast.List)):
        return [_names(element) for element in target.elts]
    return None


def name_values(graph: Graph, source_dir: Path) -> Graph:
    files: dict[str, dict[int, ast.stmt]] = {}

    def statement(node: Node) -> ast.stmt | None:
        return statement_at(node.source)

    def statement_at(source: str) -> ast.stmt | None:
        file, _, line = source.rpartition(":")
        if not file or not line.isdigit():
            return None
        if file not in files:
            path = locate(file, source_dir)
            files[file] = _statements(path) if path is not None else {}
        return files[file].get(int(line))

    wanted: dict[str, str] = {}
    compute = [node for node in graph.nodes if node.is_compute]
    position = {node.name: k for k, node in enumerate(compute)}

    def owner(path: str) -> str:
        """The innermost module on the path that is not torch.nn's: whose code made the call."""
        while path and graph.modules.get(path, "").startswith("torch."):
            path = path.rpartition(".")[0]
        return path

    def ends_at(last: Node) -> bool:
        """Whether nothing after `last` may still belong to its statement: the next op is not
        inside a module of the model's own deeper than the one that ran `last`'s statement (in
        `x = self.blocks(self.stem(x))` the stem's last op is followed by the blocks' ops)."""
        k = position[last.name] + 1
        return k == len(compute) or _within(owner(compute[k].module_path), owner(last.module_path))

    def value_of(last: Node, stmt: ast.stmt) -> Node:
        """The statement's value: its last op, or, where the statement ends in a call of a
        torch.nn layer whose ops the tracer went into (they carry the caller's line, deeper in
        the module tree: `encoded = self.encoder(x, src_key_padding_mask=ids == 0)` through
        export), the layer's."""
        end = last
        for k in range(position[last.name] + 1, len(compute)):
            node = compute[k]
            if not _within(last.module_path, node.module_path, strictly=True) or statement(node) is not stmt:
                break
            end = node
        return end if end is not last and ends_at(end) else last

    def frames(node: Node) -> list[str]:
        return [*node.callers, node.source]

    def caller_targets(value: Node) -> tuple[ast.stmt, str | list] | None:
        """What the caller's statement assigns `value` to, where `value` is what a function of
        the model's code returns (`return x + self.proj(h)` in a Block that GPT.forward calls as
        `x = block(x)`), through callers that return it in turn (`return self.inner(h)`): the
        first caller that assigns it names it. A caller's statement is the call's only if its
        value is the call and nothing after `value` runs for it; a call that is the statement's
        only call (the loop's `x = block(x)`, whose next run is the next block's) is."""
        chain = frames(value)
        k = position[value.name] + 1
        after = frames(compute[k]) if k < len(compute) else []
        module = owner(value.module_path)
        # The return statement goes on into a call it makes (`return self.inner(self.norm(x))`),
        # unless the next op is the same statement's next run (a helper called in a loop).
        if after[: len(chain)] == chain and _within(module, owner(compute[k].module_path)):
            if len(after) > len(chain) or owner(compute[k].module_path) != module:
                return None
        parent = module.rpartition(".")[0]
        # a Sequential runs its children in one call: only the last child's value is its value
        called_by_container = parent != module and graph.modules.get(parent, "").startswith("torch.") \
            and not graph.modules[parent].endswith((".ModuleList", ".ModuleDict"))  # fmt: skip
        for depth in reversed(range(len(chain) - 1)):
            caller = statement_at(chain[depth])
            call = getattr(caller, "value", None)
            if not isinstance(call, ast.Call) or isinstance(caller, ast.AugAssign):
                return None
            only_call = sum(isinstance(part, ast.Call) for part in ast.walk(call)) == 1
            if after[: depth + 1] == chain[: depth + 1] and (called_by_container or not only_call):
                return None
            called_by_container = False
            if not isinstance(caller, ast.Return):
                targets = _targets(caller)
                return (caller, targets) if targets is not None else None
        return None

    returned: dict[str, tuple[ast.stmt, str | list]] = {}  # value -> the caller's statement, its targets

    def name_returned(stmt: ast.Return, group: list[Node]) -> None:
        """Names the value a `return <expr>` statement returns after the caller's variable; a
        tuple of one op per item (`return h.tanh(), c`) after a tuple target's items."""
        value = value_of(group[-1], stmt)
        found = caller_targets(value)
        if found is None:
            return
        caller, targets = found
        if not isinstance(stmt.value, ast.Tuple):
            returned[value.name] = (caller, targets)
            # export takes the items out of a returned tuple in the callee (`return x.chunk(2)`)
            made = max((i for i, node in enumerate(group) if node.target != "operator.getitem"), default=None)
            if isinstance(targets, list) and made is not None:
                name_items({group[made].name: targets}, group[made + 1 :])
        else:
            # `return h.tanh(), c`: one value per element that computes, named after the caller's
            # target's item (`h, c = self.cell(x)`), or its name and position (`s = self.cell(x)`
            # names the items `s_0`, `s_1`) where no statement of the function names them
            elements = _element_values(stmt.value, group) or []
            items = targets if isinstance(targets, list) else [f"{targets}_{k}" for k in range(len(elements))]
            for node, item in zip(elements, items if len(items) == len(elements) else []):
                if node is not None and isinstance(item, str):
                    returned[node.name] = (caller, item)

    def calls_after(last: Node) -> bool:
        """Whether the op after `last` ran in a function that `last`'s statement called: the
        statement's value is that call's (`s1 = self.cell(frames[:, t], s1)`), not `last`'s."""
        k = position[last.name] + 1
        return bool(last.source) and k < len(compute) and last.source in compute[k].callers

    def finish(stmt: ast.stmt, group: list[Node]) -> None:
        targets = _targets(stmt)
        value = getattr(stmt, "value", None)
        elements = _element_values(value, group)
        if isinstance(targets, str) and elements is not None:
            # `s1 = (h0, c0)`: a tuple of one value per element, each the tuple's item
            for k, node in enumerate(elements):
                if node is not None:
                    wanted[node.name] = f"{targets}_{k}"
            return
        if isinstance(targets, str) and group[-1].name in run_values:
            wanted[group[-1].name] = targets  # an earlier run's value, the next run's ops follow it
            return
        if isinstance(targets, str):
            # where a function of the model's code returned the statement's value (`s =
            # self.cell(x[:, t], s)`), its ops here computed the call's arguments
            if not any(caller is stmt for caller, _ in returned.values()) and not calls_after(group[-1]):
                wanted[value_of(group[-1], stmt).name] = targets
            return
        # Tuple targets name the items unpacked (getitem) from the statement's last value,
        # nested tuples included: `h, (hn, cn) = self.lstm(x)`. Only from that value: an
        # item taken on the way (`x.shape[0]` in `q, k, v = f(x.shape[0]).unbind(0)`) is no
        # item of the target.
        # `q, k, v = qkv[0], qkv[1], qkv[2]` (timm's attention): one op per element, in order.
        if isinstance(targets, list) and elements is not None and len(targets) == len(elements):
            for node, item in zip(elements, targets):
                if node is not None and isinstance(item, str):
                    wanted[node.name] = item
            return
        last = max((i for i, node in enumerate(group) if node.target != "operator.getitem"), default=None)
        # A statement that only unpacks what a call returned (`h, c = self.cell(x)`, the cell
        # ending in `return x.chunk(2)`) unpacks the call's value.
        spec: dict[str, str | list | None] = (
            {group[last].name: targets} if last is not None
            else {name: items for name, (caller, items) in returned.items() if caller is stmt}
        )  # fmt: skip
        name_items(spec, group[last + 1 if last is not None else 0 :])

    def name_items(spec: dict[str, str | list | None], items_taken: list[Node]) -> None:
        """Names the getitem nodes `items_taken` after the items of the targets `spec` gives
        the values they are taken from, nested tuples included."""
        for node in items_taken:
            source = node.args[0] if node.args else None
            index = node.args[1] if len(node.args) > 1 else None
            if isinstance(source, Ref) and isinstance(spec.get(source.name), list):
                items = spec[source.name]
                item = items[index] if isinstance(index, int) and 0 <= index < len(items) else None
                if isinstance(item, str):
                    wanted[node.name] = item
                spec[node.name] = item

    groups: list[tuple[ast.stmt, list[Node]]] = []
    open_groups: dict[str, tuple[ast.stmt | None, list[Node]]] = {}
    for k, node in enumerate(compute):
        # Inside a torch.nn container (a Sequential), the source line is the caller's statement,
        # which names the container's result, not these ops.
        stmt = None if node.module_class.startswith("torch.") else statement(node)
        current = open_groups.get(node.module_path)
        if current is not None and current[0] is stmt and stmt is not None:
            current[1].append(node)
            continue
        following = compute[k + 1] if k + 1 < len(compute) else None
        if stmt is not None and current is not None and current[0] is not None and node.target == "operator.getitem" \
                and following is not None and following.module_path == node.module_path and statement(following) is current[0]:  # fmt: skip
            # an item taken out of a container ahead of its own statement (unpack_containers_early
            # moves `routed["aux"]` of `return out, routed["aux"]` up to the container's call) is
            # a statement of its own that leaves the one it interrupts whole
            groups.append((stmt, [node]))
            continue
        if current is not None and current[0] is not None:
            groups.append(current)
        open_groups[node.module_path] = (stmt, [node])
    groups.extend((stmt, group) for stmt, group in open_groups.values() if stmt is not None)
    # A statement that a loop runs again with only other modules' ops in between (`h = h +
    # block(h)`) gathered all its runs in one group; each run assigns the variable anew.
    run_values: set[str] = set()
    split: list[tuple[ast.stmt, list[Node]]] = []
    for stmt, group in groups:
        kinds = [graph.modules.get(node.target, node.target) if node.op == "call_module" else node.target for node in group]
        runs = _loop_runs(stmt, group, kinds)
        run_values.update(run[-1].name for run in runs[:-1])
        split.extend((stmt, run) for run in runs)
    groups = split
    # Returned values first: the statement that unpacks one names its items.
    for stmt, group in groups:
        if isinstance(stmt, ast.Return) and stmt.value is not None:
            name_returned(stmt, group)
    for stmt, group in groups:
        finish(stmt, group)
    # A statement that only calls a torch.nn layer whose ops the tracer went into (export's
    # Transformer layers, a Sequential's children) has no op at the caller's level: its value
    # is the last of the run of the layer's ops, unless the statement goes on around the run.
    runs: list[tuple[ast.stmt | None, list[Node]]] = []
    for node in compute:
        stmt = statement(node) if node.module_class.startswith("torch.") else None
        if runs and stmt is not None and runs[-1][0] is stmt:
            runs[-1][1].append(node)
        else:
            runs.append((stmt, [node]))
    for k, (stmt, run) in enumerate(runs):
        targets = _targets(stmt) if stmt is not None else None
        around = [runs[j][1][i] for j, i in ((k - 1, -1), (k + 1, 0)) if 0 <= j < len(runs)]
        if isinstance(targets, str) and all(statement(node) is not stmt for node in around) and ends_at(run[-1]):
            wanted.setdefault(run[-1].name, targets)

    for name, (_, targets) in returned.items():
        if isinstance(targets, str):
            wanted.setdefault(name, targets)
    wanted.update(_layer_outputs(graph, compute))

    taken = {node.name for node in graph.nodes}
    renames: dict[str, str] = {}
    labels: dict[str, str] = {}
    by_name = {node.name: node for node in graph.nodes}
    readers = graph.users()
    assigned = set(wanted.values())  # names a statement gives, which a name of ftc's must not take first
    for node in graph.nodes:
        base = wanted.get(node.name) or _written_name(node, by_name, labels) or _size_item_name(node, by_name, readers) \
            or _key_name(node, assigned, labels)  # fmt: skip
        if base is None or base.startswith("_") or base == "self":
            if node.is_compute:
                label = labels[node.name] = node.label or default_label(node)  # a frontend's label, if it gave one
                if node.op != "call_module" and label not in taken | assigned and re.fullmatch(rf"{re.escape(label)}_\d+", node.name):
                    # the tracer counts each op over the whole model (export's `linear_32`, the
                    # model's output, where the 32 linears before it took their layers' names),
                    # a counter that is the value's name in pipeline.json where it crosses stages
                    taken.discard(node.name)
                    renames[node.name] = unique_name(label, taken)
            continue
        labels[node.name] = base
        taken.discard(node.name)
        renames[node.name] = unique_name(base, taken)

    nodes = [replace(node, label=labels.get(node.name, node.label)) for node in graph.nodes]
    return replace(graph, nodes=nodes).renamed(renames)


_OPERATOR_NAMES = {
    ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
    ast.Mod: "mod", ast.Pow: "pow", ast.MatMult: "matmul",
}  # fmt: skip


def _loop_runs(stmt: ast.stmt, group: list[Node], kinds: list[str]) -> list[list[Node]]:
    """The runs of `name = <expr reading name>` in `group` (the kinds of whose ops are `kinds`:
    targets, a module call's class), where a loop ran it again (`for block in self.blocks: h = h
    + block(h)`), else [group]. Counted from the end, as runs of one period of ops (the first run
    keeps the ops a tracer shared between runs, export's one `mask.unsqueeze(-1)`), each next
    run reading the run before's value, and each operator and function of the statement that a
    run has there as often as the statement writes it (so `x = x + attn(x) + mlp(x)` runs two
    adds, and `x = x.relu().relu()` is one run of two relus)."""
    target = _targets(stmt)
    value = getattr(stmt, "value", None)
    if not isinstance(stmt, ast.Assign) or not isinstance(target, str) or value is None:
        return [group]
    if not any(isinstance(node, ast.Name) and node.id == target for node in ast.walk(value)):
        return [group]
    short = [kind.rpartition(".")[2] for kind in kinds]
    written: dict[str, int] = {}
    for node in ast.walk(value):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATOR_NAMES:
            name = _OPERATOR_NAMES[type(node.op)]
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        else:
            continue
        written[name] = written.get(name, 0) + 1
    for period in range(1, len(group) // 2 + 1):
        if kinds[-1 - period] != kinds[-1]:
            continue
        last = kinds[-period:]
        # an op the run lacks may be one the tracer shared between runs; one it has, it must
        # have as often as the statement writes it
        if any(0 < short[-period:].count(name) < count for name, count in written.items()):
            continue
        starts = [len(group) - period]
        while starts[-1] - period >= 0 and kinds[starts[-1] - period : starts[-1]] == last:
            starts.append(starts[-1] - period)
        starts = sorted(starts)
        starts[0] = 0
        runs = [group[begin:end] for begin, end in zip(starts, [*starts[1:], len(group)])]
        pairs = zip(runs, runs[1:])
        if len(runs) > 1 and all(any(before[-1].name in node.refs() for node in after) for before, after in pairs):
            return runs
    return [group]


def _layer_outputs(graph: Graph, compute: list[Node]) -> dict[str, str]:
    """The value a layer of the model's code returns (a module of its own, not torch.nn's, with
    no submodules, whose ops the tracer went into: transformers' Conv1D, an activation, an RMS
    norm), named after the layer's attribute, as a torch.nn layer's call is: `c_attn` rather
    than the layer's own `x` (or the tracer's `mul_3`), where the caller reads it. Each run of
    the layer's ops whose only value read after the run is its last is such a call."""
    parents = {path.rpartition(".")[0] for path in graph.modules if path}
    last_read: dict[str, int] = {}
    for k, node in enumerate(compute):
        for ref in (*arg_refs(node.args), *arg_refs(node.kwargs)):
            last_read[ref] = k
    for ref in graph.outputs.values:
        last_read[ref.name] = len(compute)
    names: dict[str, str] = {}
    start = 0
    for k, node in enumerate(compute):
        if k + 1 < len(compute) and compute[k + 1].module_path == node.module_path:
            continue
        run, start = compute[start : k + 1], k + 1
        path = node.module_path
        attribute = path.rpartition(".")[2]
        if not path or path in parents or graph.modules.get(path, "torch.").startswith("torch."):
            continue
        if not attribute.isidentifier() or keyword.iskeyword(attribute) or attribute.startswith("_"):
            continue
        read_after = [member for member in run if last_read.get(member.name, -1) > k]
        if read_after == [node] and node.mutates is None:
            names[node.name] = attribute
    return names


def _within(outer: str, path: str, strictly: bool = False) -> bool:
    """Whether module `path` is module `outer` or inside it (only inside, when `strictly`)."""
    inside = not outer or path.startswith(f"{outer}.")
    return (inside and path != outer) if strictly else inside or path == outer


def _written_name(node: Node, nodes: dict[str, Node], labels: dict[str, str]) -> str | None:
    """An in-place op's value is the tensor it writes, so it takes that tensor's name: `mean` for
    `self.norm.mean.mul_(0.9)` (not the tracer's `mul_`, or export's `add__7` for the `.add_(m)`
    after it), `h` for `h.add_(x)`."""
    if node.mutates is None or node.mutates >= len(node.args) or not isinstance(node.args[node.mutates], Ref):
        return None
    written = nodes.get(node.args[node.mutates].name)
    if written is None:
        return None
    if written.op == "get_attr":
        return written.target.rpartition(".")[2]
    return labels.get(written.name, written.name)


def _element_values(value: ast.expr | None, group: list[Node]) -> list[Node | None] | None:
    """The values of the elements of a tuple expression (`x[..., :n], x[..., n:]`), in order,
    among the ops of its statement: the ops no later op of the statement reads (what an element
    computed on the way, `x.shape[-1] // 2`, its next op reads), one per element that computes
    (None for an element that is a name or a constant, which computes nothing); else None."""
    if not isinstance(value, ast.Tuple) or any(isinstance(element, ast.Starred) for element in value.elts):
        return None
    read = {name for node in group for name in node.refs()}
    ends = iter([node for node in group if node.name not in read])
    computing = [not isinstance(element, (ast.Name, ast.Constant)) for element in value.elts]
    if sum(computing) != len(group) - len(read & {node.name for node in group}):
        return None
    return [next(ends) if computes else None for computes in computing]


def _size_item_name(node: Node, nodes: dict[str, Node], readers: dict[str, list[str]]) -> str | None:
    """An item or a slice of a tensor's size that no statement names (`x.shape[-2:]` inside a
    call, the tracer's `getitem`): the keyword that the one call reading it passes it as
    (`size` in `F.interpolate(y, size=x.shape[-2:])`), else `size`."""
    if node.op != "call_function" or node.target != "operator.getitem" or len(node.args) != 2:
        return None
    source = nodes.get(node.args[0].name) if isinstance(node.args[0], Ref) else None
    if source is None or not (
        (source.op == "call_function" and source.target == "getattr" and source.args[1:] == ("shape",))
        or (source.op == "call_method" and source.target == "size" and len(source.args) == 1 and not source.kwargs)
    ):
        return None
    users = readers.get(node.name, [])
    if len(users) == 1:
        keywords = [key for key, value in nodes[users[0]].kwargs.items() if value == Ref(node.name)]
        if len(keywords) == 1 and keywords[0].isidentifier() and not keyword.iskeyword(keywords[0]):
            return keywords[0]
    return "size"


def _key_name(node: Node, assigned: set[str], labels: dict[str, str]) -> str | None:
    """An item of a dict that no statement names (`return out, routed["aux"]`, the tracer's
    `getitem_1`): its key, where the key is a name; where a statement gives that name a value
    (in `out = self.head(routed["out"])` the head's), the dict's name and the key, `routed_out`."""
    if node.op != "call_function" or node.target != "operator.getitem" or len(node.args) != 2:
        return None
    key = node.args[1]
    if not (isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)):
        return None
    container = labels.get(node.args[0].name) if isinstance(node.args[0], Ref) else None
    return key if key not in assigned else f"{container}_{key}" if container else None


def default_label(node: Node) -> str:
    """The tracer's name without its counter ("add" for "add_3"); a module call's value is
    named after the module's attribute ("qkv" for blocks.0.attn.qkv), as one would write it, an
    item of a container after the container and its index ("mlp_0" for blocks.2.mlp.0)."""
    if node.op == "call_module":
        base = node.target.replace(".", "_")
        parts = node.target.split(".")
        named = [k for k, part in enumerate(parts) if part.isidentifier()]
        label = "_".join(parts[named[-1] :]) if named else base
    elif node.target == "getattr" and len(node.args) == 2 and isinstance(node.args[1], str):
        base, label = "getattr", node.args[1]
    else:
        parts = node.target.split(".")
        # "torch.ops.aten.view.default" -> "view"; "operator.add" -> "add"; "view" -> "view"
        base = label = parts[-2] if node.target.startswith("torch.ops.") and len(parts) > 1 else parts[-1]
    if re.fullmatch(rf"{re.escape(base)}(_\d+)?", node.name):
        return label
    return node.name
