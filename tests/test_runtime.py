"""How every `fedmq` command logs: text for people, or one JSON object per line."""

from __future__ import annotations

import json
import logging

from fedmq.runtime import JsonFormatter, log_formatter


def record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.getLogger("fedmq.test").makeRecord(
        "fedmq.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)
    return made


def test_a_json_line_has_time_level_logger_message_and_the_extra_fields():
    line = JsonFormatter().format(record("round %d closed: %s", 3, "ok", round=3,
                                         device="pi-1", took_s=0.25))
    assert "\n" not in line
    data = json.loads(line)
    assert data == {"time": data["time"], "level": "WARNING", "logger": "fedmq.test",
                    "message": "round 3 closed: ok", "round": 3, "device": "pi-1",
                    "took_s": 0.25}
    assert data["time"].endswith("+00:00") and "T" in data["time"]


def test_a_traceback_stays_inside_its_json_line():
    try:
        raise ValueError("bad value")
    except ValueError:
        import sys

        line = JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert len(line.splitlines()) == 1
    data = json.loads(line)
    assert "ValueError: bad value" in data["exception"] and data["message"] == "failed"


def test_an_extra_field_json_cannot_hold_is_written_as_text():
    data = json.loads(JsonFormatter().format(record("x", path=object.__new__(object))))
    assert data["path"].startswith("<object object")


def test_text_is_the_default_format():
    line = log_formatter("text").format(record("hello %s", "fleet"))
    assert line.endswith("WARNING fedmq.test: hello fleet")
