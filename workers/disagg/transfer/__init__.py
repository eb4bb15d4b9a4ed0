"""KV transfer data plane between a prefill worker (sender) and a decode worker (receiver).

One 2-rank torch.distributed group per (prefill, decode) pair, met through a TCPStore the
decode worker hosts (pair.py); transfers ordered by sequence number, sent layer by layer
as the prefill computes them (sender.py, receiver.py); every transfer bounded by a
deadline enforced outside the blocking calls, after which the pair is rebuilt. NCCL for
CUDA caches, gloo for CPU caches, one code path. Wire formats: raw tensor bytes and JSON
frames (protocol.py); nothing is ever unpickled.
"""

from tandem.workers.disagg.transfer.layout import KVLayout, KVLayoutMismatch
from tandem.workers.disagg.transfer.pack import pack_layer, packed_nbytes, unpack_layer
from tandem.workers.disagg.transfer.protocol import TransferFailed, TransferResult, TransferTicket
from tandem.workers.disagg.transfer.receiver import KVReceiver
from tandem.workers.disagg.transfer.sender import KVSender, KVSendTransfer

__all__ = [
    "KVLayout",
    "KVLayoutMismatch",
    "KVReceiver",
    "KVSendTransfer",
    "KVSender",
    "TransferFailed",
    "TransferResult",
    "TransferTicket",
    "pack_layer",
    "packed_nbytes",
    "unpack_layer",
]
