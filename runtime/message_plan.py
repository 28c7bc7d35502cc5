"""The message plan of a step: who reads what, and every message of the step with the actions
that send and await it. Every rank derives it from pipeline.json and the simulated schedule
(runtime/schedule.py), so the ranks agree on it without talking."""

from __future__ import annotations

from . import comm
from .comm import ACTIVATION, GRADIENT, Message
from .pipeline import Pipeline
from .schedule import BACKWARD, FORWARD, Action

LOSS = -1  # the loss on the last stage's device, as a reader of the model's outputs


class Plan:
    """Who reads what, and every message of a step with the actions that send and await it."""

    def __init__(self, pipeline: Pipeline, order: list[Action], micro_batches: int, values: dict | None = None):
        self.specs = {s.index: s for s in pipeline.stages}
        # The value specs: pipeline.json's, with the dtypes of autocast (precision.value_specs).
        self.values = values if values is not None else pipeline.manifest["values"]
        self.device_of = {s.index: s.device for s in self.specs.values()}
        self.loss_stage = pipeline.stages[-1].index
        self.loss_device = self.device_of[self.loss_stage]
        self.inputs = list(pipeline.inputs)
        self.outputs = list(pipeline.outputs)
        # load_pipeline has checked that every value read is produced or an input, with a spec.
        self.producer = producer = {name: s.index for s in self.specs.values() for name in s.outputs}
        # (device, value) -> the local readers of the value, in the order their gradients add up.
        uses: dict[tuple[int, str], list[int]] = {}
        for s in self.specs.values():
            for name in s.inputs:
                uses.setdefault((s.device, name), []).append(s.index)
        for name in dict.fromkeys(self.outputs):  # a value the model returns twice is read once
            uses.setdefault((self.loss_device, name), []).append(LOSS)
        self.uses = {key: sorted(readers, key=lambda u: (u == LOSS, u)) for key, readers in uses.items()}
        self.data_devices = {device for device, name in self.uses if name in self.inputs}
        self.readers: dict[str, list[int]] = {}  # value -> other devices that read it
        for device, name in sorted(self.uses):
            if name in producer and device != self.device_of[producer[name]]:
                self.readers.setdefault(name, []).append(device)
        self.leaves = {
            name: comm.leaf_specs(name, spec, sendable=name in self.readers)
            for name, spec in self.values.items()
            if name in producer
        }
        # value -> the positions of its leaves that carry a gradient back
        self.gradient_leaves = {
            name: [k for k, leaf in enumerate(leaves) if comm.carries_grad(leaf)]
            for name, leaves in self.leaves.items()
        }
        self._plan_messages(order, micro_batches)

    def _plan_messages(self, order: list[Action], micro_batches: int) -> None:
        position = {action: k for k, action in enumerate(order)}

        def reader_action(use: int, kind: str, m: int) -> Action:
            return Action(kind, self.loss_stage if use == LOSS else use, m)

        self.sends_after: dict[Action, list[Message]] = {}
        self.awaits_before: dict[Action, list[Message]] = {}
        self.activation_in: dict[tuple[int, str, int], Message] = {}
        messages: list[tuple[tuple, Message, Action]] = []
        for name, devices in self.readers.items():
            stage = self.producer[name]
            src = self.device_of[stage]
            for device in devices:
                readers = self.uses[(device, name)]
                for m in range(micro_batches):
                    forward = Action(FORWARD, stage, m)
                    first = min((reader_action(u, FORWARD, m) for u in readers), key=position.__getitem__)
                    message = Message(ACTIVATION, name, m, src, device)
                    messages.append(((position[forward], name, device), message, first))
                    self.activation_in[(device, name, m)] = message
                    if self.gradient_leaves[name]:
                        last = max((reader_action(u, BACKWARD, m) for u in readers), key=position.__getitem__)
                        message = Message(GRADIENT, name, m, device, src)
                        messages.append(((position[last], name, device), message, Action(BACKWARD, stage, m)))
        # Sends go out in the global order of the actions that send them, so both ends of every
        # pair of devices post their messages in that same order: all of them when training,
        # the activations alone when only forwards run.
        value_position = {name: k for k, name in enumerate(self.values)}
        messages.sort(key=lambda item: (item[0][0], value_position[item[0][1]], item[0][2]))
        self.incoming: dict[tuple[bool, int, int], list[Message]] = {}  # (training, dst, src) -> queue
        self.queue_position: dict[tuple[bool, Message], int] = {}
        # Positions in the global order of the action after which a message is sent and of the
        # one before which it is awaited: a message from b to a sent at or after the action where
        # b awaited a message from a proves that one delivered.
        self.sent_at: dict[Message, int] = {}
        self.awaited_at: dict[Message, int] = {}
        for key, message, reader in messages:
            self.sent_at[message] = key[0]
            self.awaited_at[message] = position[reader]
            self.sends_after.setdefault(order[key[0]], []).append(message)
            self.awaits_before.setdefault(reader, []).append(message)
            for training in (True, False) if message.kind == ACTIVATION else (True,):
                queue = self.incoming.setdefault((training, message.dst, message.src), [])
                self.queue_position[(training, message)] = len(queue)
                queue.append(message)
