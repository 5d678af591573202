"""Moved to `bridge.client.history` (reading the event history):
this module only re-exports it, for one release. Import from `bridge.client`
(or `bridge.client.history`) instead.
"""

from __future__ import annotations

from bridge.client.history import (
    DEFAULT_PREFETCH as DEFAULT_PREFETCH,
)
from bridge.client.history import (
    DEFAULT_SKEW as DEFAULT_SKEW,
)
from bridge.client.history import (
    HISTORY_STREAM as HISTORY_STREAM,
)
from bridge.client.history import (
    MARKER_TYPE as MARKER_TYPE,
)
from bridge.client.history import (
    HistoryError as HistoryError,
)
from bridge.client.history import (
    event_time as event_time,
)
from bridge.client.history import (
    history_window as history_window,
)
from bridge.client.history import (
    in_window as in_window,
)
from bridge.client.history import (
    is_marker as is_marker,
)
from bridge.client.history import (
    parse_when as parse_when,
)
from bridge.client.history import (
    stream_offset as stream_offset,
)
from bridge.client.history import (
    topic_matches as topic_matches,
)
