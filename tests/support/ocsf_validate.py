"""Validate OCSF events (one JSON object a line on stdin) against the OCSF 1.7.0 schema that
PyPI `pydantic-ocsf` ships, offline.

Each event is validated by the pydantic model of its class (required attributes, types, enum
values of the class, category/class/type uids, sibling captions). The models accept unknown
attributes (`extra="allow"`), so this script also refuses any attribute the class or object
does not define, except the attributes of the profiles Airlock declares in
`metadata.profiles` (security_control, host), which it checks against the schema's
dictionary (enum values, sibling captions) and object models itself.

Prints `ok <class_uid> <uid>` per valid event; exits 1 naming every problem otherwise.
"""

import json
import sys

from pydantic import BaseModel, ValidationError

from ocsf._schema_loader import get_schema_loader  # noqa: F401 (the schema's presence)
from ocsf.v1_7_0 import events, objects

CLASSES = {
    2004: events.DetectionFinding,
    3004: events.EntityManagement,
    4001: events.NetworkActivity,
    6002: events.ApplicationLifecycle,
    6003: events.ApiActivity,
}

# Attributes the profiles add to a class (OCSF 1.7.0 `security_control` and `host`).
PROFILE_ATTRIBUTES = {
    "security_control": {
        "action": str,
        "action_id": int,
        "disposition": str,
        "disposition_id": int,
        "policy": objects.Policy,
        "is_alert": bool,
    },
    "host": {"device": objects.Device, "actor": objects.Actor},
}


def schema_dictionary():
    import importlib.resources

    path = importlib.resources.files("ocsf") / "schemas" / "v1_7_0.json"
    return json.loads(path.read_text())["dictionary"]["attributes"]


DICTIONARY = schema_dictionary()


def extras(model, path):
    """Every attribute a validated model (and the models inside it) does not define."""
    found = []
    for key in model.model_extra or {}:
        found.append(f"{path}.{key}")
    for name in type(model).model_fields:
        if name == "unmapped":
            continue  # OCSF's place for source attributes it does not define
        value = getattr(model, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                sub = f"{path}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                found.extend(extras(item, sub))
    return found


def check_enum(name, event, problems):
    """`name`_id must be in the dictionary's enum; its sibling caption must match (unless 99)."""
    id_key = f"{name}_id"
    if id_key not in event:
        return
    enum = DICTIONARY[id_key]["enum"]
    value = event[id_key]
    if str(value) not in enum:
        problems.append(f"{id_key}={value} is not in the schema's enum {sorted(enum, key=int)}")
        return
    caption = enum[str(value)]["caption"]
    if name in event and value != 99 and event[name] != caption:
        problems.append(f"{name}={event[name]!r} does not match {id_key}={value} ({caption!r})")


def validate(event):
    problems = []
    cls = CLASSES.get(event.get("class_uid"))
    if cls is None:
        return [f"class_uid {event.get('class_uid')} is not one Airlock emits"]
    profiles = event.get("metadata", {}).get("profiles", [])
    allowed = {}
    for p in profiles:
        if p not in PROFILE_ATTRIBUTES:
            problems.append(f"unknown profile {p}")
            continue
        allowed.update(PROFILE_ATTRIBUTES[p])
    core = {k: v for k, v in event.items() if k not in allowed or k in cls.model_fields}
    try:
        model = cls.model_validate(core)
    except ValidationError as e:
        return problems + [f"{cls.__name__}: {e}"]
    problems += [f"attribute {x} is not defined by the schema" for x in extras(model, "event")]
    for key, kind in allowed.items():
        if key not in event or key in cls.model_fields:
            continue
        value = event[key]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            try:
                sub = kind.model_validate(value)
                problems += [f"attribute {x} is not defined by the schema" for x in extras(sub, key)]
            except ValidationError as e:
                problems.append(f"{key}: {e}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{key} must be {kind.__name__}, got {value!r}")
    check_enum("action", event, problems)
    check_enum("disposition", event, problems)
    check_enum("severity", event, problems)
    meta = event.get("metadata", {})
    if meta.get("version") != "1.7.0":
        problems.append(f"metadata.version is {meta.get('version')!r}, not 1.7.0")
    if not isinstance(event.get("time"), int) or event["time"] < 10**12:
        problems.append("time must be milliseconds since the epoch")
    return problems


def main():
    failed = 0
    count = 0
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        count += 1
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {n}: not JSON: {e}")
            failed += 1
            continue
        problems = validate(event)
        if problems:
            failed += 1
            for p in problems:
                print(f"line {n} (class {event.get('class_uid')}): {p}")
        else:
            print(f"ok {event['class_uid']} {event.get('metadata', {}).get('uid')}")
    if count == 0:
        print("no events on stdin")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
