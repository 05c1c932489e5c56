"""The canvas: task calls as data (signatures) and their compositions.

``Signature`` packs one call; ``chain`` runs calls one after another, each getting
the previous result; ``group`` runs calls in parallel; ``chord`` runs a group, then
one call with all its results; ``chunks``, ``xmap`` and ``xstarmap`` split an
iterable over few messages. Every one of them is a dict in Celery's signature layout
(``task, args, kwargs, options, subtask_type, immutable``), so they travel inside
task messages (callbacks, errbacks, the ``chain`` and ``chord`` fields) and a Celery
process reads them as its own. ``docs/dev/celery-canvas-formats.md`` records the
formats this package follows.

How the pieces move (the worker side is in ``kernel.worker.execute``):

* a chain is sent as its first task, with the remaining steps, in reverse order, in
  the message's ``chain`` field; the worker sends the next step with the result;
* a group sends each member with the group's id and the member's index;
* a chord registers its header with the result backend (which must support chords),
  then sends the header as a group whose members carry the body in their ``chord``
  field; the backend fires the body once, when the last member finished.
"""

from kernel.canvas.chain import chain
from kernel.canvas.chord import chord
from kernel.canvas.group import group
from kernel.canvas.maps import chunks, xmap, xstarmap
from kernel.canvas.signature import Signature, maybe_signature, signature

__all__ = [
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]
