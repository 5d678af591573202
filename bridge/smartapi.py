"""Moved to `bridge.client.smartapi` (the SmartApi command language):
this module only re-exports it, for one release. Import from `bridge.client`
(or `bridge.client.smartapi`) instead.
"""

from __future__ import annotations

from bridge.client.smartapi import (
    CALENDARS as CALENDARS,
)
from bridge.client.smartapi import (
    COMMANDS as COMMANDS,
)
from bridge.client.smartapi import (
    CONFUSABLES as CONFUSABLES,
)
from bridge.client.smartapi import (
    DIALABLE as DIALABLE,
)
from bridge.client.smartapi import (
    FORBIDDEN as FORBIDDEN,
)
from bridge.client.smartapi import (
    MAX_COMMANDS as MAX_COMMANDS,
)
from bridge.client.smartapi import (
    MAX_SCRIPT as MAX_SCRIPT,
)
from bridge.client.smartapi import (
    MAX_TEXT as MAX_TEXT,
)
from bridge.client.smartapi import (
    Calendar as Calendar,
)
from bridge.client.smartapi import (
    ClearUserData as ClearUserData,
)
from bridge.client.smartapi import (
    Command as Command,
)
from bridge.client.smartapi import (
    Exit as Exit,
)
from bridge.client.smartapi import (
    GetData as GetData,
)
from bridge.client.smartapi import (
    Kind as Kind,
)
from bridge.client.smartapi import (
    MusicOnHold as MusicOnHold,
)
from bridge.client.smartapi import (
    PlayAnnouncement as PlayAnnouncement,
)
from bridge.client.smartapi import (
    Playback as Playback,
)
from bridge.client.smartapi import (
    SayClock as SayClock,
)
from bridge.client.smartapi import (
    SayDate as SayDate,
)
from bridge.client.smartapi import (
    SayDigit as SayDigit,
)
from bridge.client.smartapi import (
    SayDuration as SayDuration,
)
from bridge.client.smartapi import (
    SayNumber as SayNumber,
)
from bridge.client.smartapi import (
    SetExten as SetExten,
)
from bridge.client.smartapi import (
    SetLimitOnCall as SetLimitOnCall,
)
from bridge.client.smartapi import (
    SmartApiCommand as SmartApiCommand,
)
from bridge.client.smartapi import (
    SmartApiError as SmartApiError,
)
from bridge.client.smartapi import (
    UnsafeArgument as UnsafeArgument,
)
from bridge.client.smartapi import (
    build as build,
)
from bridge.client.smartapi import (
    check_int as check_int,
)
from bridge.client.smartapi import (
    check_name as check_name,
)
from bridge.client.smartapi import (
    check_script as check_script,
)
from bridge.client.smartapi import (
    check_text as check_text,
)
from bridge.client.smartapi import (
    parse as parse,
)
from bridge.client.smartapi import (
    unsafe_char as unsafe_char,
)
