"""Runs engine cases in local mode (imported by tests/test_engine.py) or, one process per device,
under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N engine_worker.py
CASES.json OUT_DIR`), saving each rank's losses and parameter gradients to OUT_DIR/<case>.<rank>.pt.

A case: {"name", "folder" (a generated pipeline), "schedule", "micro_batches", "recompute",
"batch", "steps", "target": ["randint", high, shape] | ["binary", shape] | ["randn", shape],
"dropout": bool}; shapes leave out the batch dimension.
A case that raises FtcError saves {"error": message} instead.
A case {"name", "timeout": seconds} checks that a rank waiting on a peer that never sends
fails in time with a clear error; it must come last, since it leaves the transport unusable.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from ftc.ir import FtcError
from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.engine import Engine

MODEL_SEED = 0
DATA_SEED = 1
ENGINE_SEED = 7
LEARNING_RATE = 0.1


def case_batches(case: dict, model_file) -> list[tuple]:
    """The (inputs, targets) of every step of a case, the same in every process."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(DATA_SEED)
    batches = []
    for _ in range(case["steps"]):
        inputs = model_file.inputs(case["batch"])
        kind, *args = case["target"]
        if kind == "randint":
            targets = torch.randint(0, args[0], [case["batch"], *args[1]])
        elif kind == "binary":
            targets = torch.randint(0, 2, [case["batch"], *args[0]]).float()
        else:
            targets = torch.randn([case["batch"], *args[0]])
        batches.append((inputs, targets))
    torch.random.set_rng_state(generator_state)
    return batches


def build_model(model_file, dropout: bool) -> torch.nn.Module:
    torch.manual_seed(MODEL_SEED)
    model = model_file.build()
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def run_case(case: dict, distributed: bool) -> dict:
    """Train `steps` steps (SGD in between); return the per-step losses, the last step's
    gradients by parameter name (of this process's stages), and evaluate()'s loss and output on
    the last batch with the model in eval mode."""
    pipeline = load_pipeline(case["folder"])
    model_file = load_model_file(pipeline.model_file)
    model = build_model(model_file, case.get("dropout", True))
    rank = dist.get_rank() if distributed else None
    modules = {
        spec.index: pipeline.stage_class(spec)(model)
        for spec in pipeline.stages
        if not distributed or spec.device == rank
    }
    engine = Engine(
        pipeline,
        modules,
        schedule=case["schedule"],
        micro_batches=case["micro_batches"],
        loss_fn=model_file.loss_fn,
        seed=ENGINE_SEED,
        device=torch.device("cpu"),
        recompute=set(case.get("recompute", [])),
        distributed=distributed,
    )
    parameters = engine.parameters()
    optimizer = torch.optim.SGD(parameters, lr=LEARNING_RATE) if parameters else None
    most_pending = _count_pending_sends(engine) if distributed else [0]
    losses = []
    for step, (inputs, targets) in enumerate(case_batches(case, model_file)):
        for param in parameters:
            param.grad = None
        losses.append(engine.train_step(step, inputs, targets))
        engine.sync_shared_grads()
        if optimizer is not None and step < case["steps"] - 1:
            optimizer.step()
    grads = {}
    for module in modules.values():
        for name, param in module.named_parameters(remove_duplicate=False):
            if param.grad is not None:
                grads[name] = param.grad.clone()
    most_pending_in_training = most_pending[0]
    model.eval()
    evaluation_loss, output = engine.evaluate(case["steps"], inputs, targets)
    return {
        "losses": losses,
        "grads": grads,
        "evaluation": (evaluation_loss, output),
        "most_pending_sends": most_pending_in_training,
    }


def _count_pending_sends(engine: Engine) -> list[int]:
    """A one-element list that keeps the most sends the transport held at once."""
    most = [0]
    transport = engine.transport
    send = transport.send

    def counting_send(message, payload):
        send(message, payload)
        most[0] = max(most[0], len(transport.pending_sends))

    transport.send = counting_send
    return most


def run_timeout_case(case: dict, out_dir: str) -> None:
    """Rank 0 never sends; rank 1 must give up within the timeout with an error naming both."""
    pipeline = load_pipeline(case["folder"])
    model_file = load_model_file(pipeline.model_file)
    model = build_model(model_file, False)
    rank = dist.get_rank()
    modules = {s.index: pipeline.stage_class(s)(model) for s in pipeline.stages if s.device == rank}
    engine = Engine(
        pipeline,
        modules,
        schedule="gpipe",
        micro_batches=2,
        loss_fn=model_file.loss_fn,
        seed=ENGINE_SEED,
        device=torch.device("cpu"),
        distributed=True,
        timeout_s=case["timeout"],
        batch_size=case["batch"],
    )
    result_path = os.path.join(out_dir, f"{case['name']}.json")
    if rank == 0:
        deadline = time.monotonic() + 3 * case["timeout"] + 10
        while not os.path.exists(result_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    _, targets = case_batches(case, model_file)[0]
    start = time.monotonic()
    try:
        engine.train_step(17, None, targets if rank == pipeline.stages[-1].device else None)
        outcome = {"error": None}
    except FtcError as exc:
        outcome = {"error": str(exc)}
    outcome["seconds"] = time.monotonic() - start
    temporary = result_path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(outcome, file)
    os.replace(temporary, result_path)


def main(cases_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    for case in json.loads(open(cases_path).read()):
        if "timeout" in case:
            run_timeout_case(case, out_dir)
            sys.stdout.flush()
            os._exit(0)  # the timed-out transport cannot be shut down cleanly
        try:
            result = run_case(case, distributed=True)
        except FtcError as exc:
            result = {"error": str(exc)}
        torch.save(result, os.path.join(out_dir, f"{case['name']}.{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skips the interpreter's teardown of the transport, as ftc.runtime.worker does
