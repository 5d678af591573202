"""Moved to `bridge.client.responder` (answering dialplan components):
this module only re-exports it, for one release. Import from `bridge.client`
(or `bridge.client.responder`) instead.
"""

from __future__ import annotations

from bridge.client.responder import (
    Answer as Answer,
)
from bridge.client.responder import (
    ComponentAnswer as ComponentAnswer,
)
from bridge.client.responder import (
    ComponentRequest as ComponentRequest,
)
from bridge.client.responder import (
    ExtenApiAnswer as ExtenApiAnswer,
)
from bridge.client.responder import (
    Fail as Fail,
)
from bridge.client.responder import (
    Handler as Handler,
)
from bridge.client.responder import (
    IvrApiAnswer as IvrApiAnswer,
)
from bridge.client.responder import (
    Responder as Responder,
)
from bridge.client.responder import (
    SmartApiAnswer as SmartApiAnswer,
)
from bridge.client.responder import (
    TrunkApiAnswer as TrunkApiAnswer,
)
from bridge.client.responder import (
    binding_key as binding_key,
)
from bridge.client.responder import (
    encode_answer as encode_answer,
)
