"""An in-process stand-in for a SuperLink with its SuperNodes, to test the ServerApp's loop fast.

:class:`LocalGrid` has the ``Grid`` methods the ServerApp and Flower's SecAgg+ workflow call
(``get_node_ids``, ``push_messages``, ``pull_messages``); each pushed message is delivered to the
real ``ClientApp`` (mods included) with that node's own ``Context``, as a SuperNode would, after
a copy (a SuperLink serializes messages; handlers may modify what they receive). Nodes can be
silenced (killed: still listed, never answer, as before the SuperLink notices a missing
heartbeat) or made to fail (their ClientApp raises). The loopback tests in test_flower.py check
the same behaviour with real Flower processes.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from feddmmr.flower import client_app

FIRST_NODE = 1000


class LocalGrid:
    def __init__(self, run_config: dict, partitions: int):
        # a Message needs the identity of the process that creates it (set by Flower's runtimes)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {FIRST_NODE + p: Context(run_id=1, node_id=FIRST_NODE + p,
                                                 node_config={"partition-id": p, "num-partitions": partitions},
                                                 state=RecordDict(), run_config=dict(run_config))
                         for p in range(partitions)}
        self.silent_when: dict[int, Callable[[Message], bool]] = {}  # node -> never answers these (killed)
        self.fail_when: dict[int, Callable[[Message], bool]] = {}  # node -> its ClientApp raises on these
        self.delivered: list[tuple[int, str]] = []  # (node, message type) of every message handled
        self.replies: list[Message] = []  # every reply a node sent, as the server received it
        self._replies: dict[str, Message] = {}

    def node(self, partition: int) -> int:
        return FIRST_NODE + partition

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink assigns it
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if node in self.silent_when and self.silent_when[node](message):
                continue
            reply = self._handle(node, _copy(message))
            self.replies.append(reply)
            self._replies[message.metadata.message_id] = reply
        return ids

    def _handle(self, node: int, message: Message) -> Message:
        self.delivered.append((node, message.metadata.message_type))
        try:
            if node in self.fail_when and self.fail_when[node](message):
                raise RuntimeError(f"injected failure on node {node}")
            return client_app.app(message, self.contexts[node])
        except Exception as exc:  # what a SuperNode returns when its ClientApp raises
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                           reply_to=message)

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


def _copy(message: Message) -> Message:
    """What a node receives: the same message id, type and group, a copy of every record."""
    content = RecordDict()
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            content[name] = ArrayRecord({k: Array.from_numpy_ndarray(v.numpy()) for k, v in record.items()})
        else:
            content[name] = type(record)({k: list(v) if isinstance(v, list) else v for k, v in record.items()})
    copy = Message(content, dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type,
                   group_id=message.metadata.group_id)
    copy.metadata.__dict__["_message_id"] = message.metadata.message_id
    return copy
