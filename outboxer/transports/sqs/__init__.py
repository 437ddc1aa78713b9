"""Amazon SQS through boto3: a destination is a queue, named (not by URL).

Wire mapping. The body is the payload's JSON as text (SQS bodies are text). The
canonical header map (:func:`outboxer.wire.encode_headers`) travels as String message
attributes, one each for ``outboxer-id``, ``outboxer-type``, ``outboxer-occurred-at``,
``outboxer-correlation-id``, ``outboxer-causation-id``, ``outboxer-key``, ``traceparent``,
``tracestate`` and ``content-type`` when present (nine at most); everything else
(``outboxer-handler``, ``outboxer-attempt``, the application's headers) is packed as one
JSON object in a tenth attribute, ``outboxer-headers``, because SQS allows ten attributes
per message. A receiver rebuilds exactly the canonical map; String and Number attributes
of messages other programs sent become headers too.

FIFO queues (names ending in ``.fifo``): ``MessageGroupId`` is the message key, or the
message id when there is none (no order asked for, so independent groups); a key SQS
would refuse (over 128 characters, or characters outside printable ASCII) is replaced by
a stable hash of itself. ``MessageDeduplicationId`` is the message id, except for a
targeted retry or replay (``handler`` set), which gets a hash of id, handler and attempt so
SQS's five-minute deduplication window does not swallow it.

Sending. One :meth:`SQSTransport.send` call splits its messages into *lanes* that run in
parallel on a pool of ``concurrency`` threads; each lane sends its ``SendMessageBatch``
calls one after the other. All messages with the same key (per queue) are in one lane, in
batch order, so they reach the queue in that order; keys and unkeyed messages are packed
so that calls carry ten entries whenever possible. A call carries at most 10 entries and
256 KiB (body plus attributes, counted as SQS counts them); a message over
``max_message_bytes`` is rejected before sending. When a keyed message is not sent (retry
or outage), later messages with its key in the same lane are held back (same outcome), so
no later message overtakes it.

Outcomes. A failed entry with ``SenderFault`` is REJECTED, unless its code is throttling
(SQS's or KMS's) or SQS's own error, and any other failed entry RETRY. A
whole call that cannot connect (refused, timed out) is UNAVAILABLE, as are bad credentials;
throttling and server errors are RETRY; a call refused as invalid is re-sent one entry per
call so only the bad message is REJECTED. A queue that does not exist is REJECTED as
``unroutable``.

Receiving. A receiver long-polls its queues (the consumer's own queue, created if
missing, and every bound destination, also created if missing); SQS does not route by
type, so everything in those queues is delivered. With several queues, one poll per queue
is kept in flight, so none starves and a receive waits about ``timeout`` in all; messages
a poll brings after ``receive`` returned are handed out by the next ``receive`` (a
consumer too busy to ask leaves them waiting there, unextended: one that waited more than
a quarter of its visibility timeout has it renewed first, one call per ten of a queue;
one that waited all of it is dropped, as SQS may have given it to another consumer). A
queue
whose poll fails rests (1 s, doubling to 30 s) before it is polled again, and is logged as
a warning (once a minute) while the other queues are read as usual; ``receive`` raises
only when every queue is failing (an outage). A message without envelope attributes
whose body is an SNS notification (a subscription without raw delivery) is marked
undecodable, so its dead letter names the fix.
``ack`` deletes, ``release`` makes the message visible again at once, ``extend`` pushes
its visibility timeout; they never raise: a message that is gone is logged at debug
level, other failures as warnings (the message then comes back after its visibility
timeout, and the inbox deduplicates it). ``ack_many`` and ``extend_many`` do the same
for many deliveries, ten of a queue per call (``DeleteMessageBatch``,
``ChangeMessageVisibilityBatch``).
"""

from __future__ import annotations

# The names the single module sqs.py had at module level stay importable from here.
from .attributes import OWN_ATTRIBUTES as OWN_ATTRIBUTES
from .attributes import PACKED_HEADERS
from .attributes import decode_attributes as decode_attributes
from .attributes import encode_attributes as encode_attributes
from .errors import error_code as error_code
from .errors import result_for_error as result_for_error
from .options import DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from .options import MAX_BATCH_ENTRIES as MAX_BATCH_ENTRIES
from .options import MAX_VISIBILITY_SECONDS as MAX_VISIBILITY_SECONDS
from .options import MAX_WAIT_SECONDS as MAX_WAIT_SECONDS
from .sending import deduplication_id as deduplication_id
from .sending import group_id as group_id
from .transport import SQSTransport

__all__ = ["PACKED_HEADERS", "SQSTransport"]
