"""The filter store: config filters read-only, API filters in the state file, validation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from milterbridge.admin.store import (
    STATE_VERSION,
    FilterStore,
    SetFailure,
    StoreWriteError,
    config_id,
)
from milterbridge.config import Config, ConfigError, HookFilter, MilterFilter, parse_config

CONFIG_TEXT = """
[[milter]]
name = "rspamd"
hostname = "127.0.0.1"

[[hook]]
name = "policy"
url = "http://127.0.0.1:8080/hook"
"""


def config() -> Config:
    return parse_config(CONFIG_TEXT, Path("/etc/milterbridge.toml"))


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "filters.json"


@pytest.fixture
def store(state_file: Path) -> FilterStore:
    return FilterStore.open(config(), state_file=state_file)


def create(store: FilterStore, kind: Any, document: dict[str, Any]) -> str:
    draft = store.draft(kind)
    record = draft.create(document)
    store.commit(draft)
    return record.id


def failure(kind: Any, document: dict[str, Any], store: FilterStore) -> SetFailure:
    with pytest.raises(SetFailure) as info:
        store.draft(kind).create(document)
    return info.value


def write_state(path: Path, document: object) -> None:
    path.write_text(json.dumps(document))


# --- ids and reading ------------------------------------------------------------------------------


def test_config_ids_are_derived_from_names_and_never_collide() -> None:
    """Plain names read as they are; '_' and '.' are escaped so two names never share an id,
    and every id stays in JMAP's id alphabet."""
    assert config_id("rspamd") == "config-rspamd"
    names = ["a.b", "a_b", "a__b", "a_2Eb", "a-b", "a.2Eb", "a_.b"]
    ids = [config_id(name) for name in names]
    assert len(set(ids)) == len(names)
    for id_ in ids:
        assert all(c.isalnum() or c in "-_" for c in id_), id_


def test_records_come_in_merge_order_with_read_only_markers(store: FilterStore) -> None:
    """Config filters first (read-only), then API filters in creation order."""
    first = create(store, "milter", {"name": "one", "hostname": "10.0.0.1"})
    second = create(store, "milter", {"name": "two", "hostname": "10.0.0.2"})
    records = store.records("milter")
    assert [(r.id, r.read_only) for r in records] == [
        ("config-rspamd", True),
        (first, False),
        (second, False),
    ]
    milters, hooks = store.filters()
    assert [m.name for m in milters] == ["rspamd", "one", "two"]
    assert [h.name for h in hooks] == ["policy"]
    assert store.find("milter", first) is records[1]
    assert store.find("hook", first) is None


def test_merged_replaces_the_filter_lists_of_a_config(store: FilterStore) -> None:
    """merged() is the configuration the service runs: everything but the filters kept."""
    create(store, "hook", {"name": "extra", "url": "https://example.org/h"})
    base = config()
    merged = store.merged(base)
    assert merged.server == base.server
    assert [h.name for h in merged.hook] == ["policy", "extra"]
    assert [m.name for m in merged.milter] == ["rspamd"]


def test_a_filter_without_a_name_is_named_after_its_id(store: FilterStore) -> None:
    """The reference's create example has no name; the id then serves as one."""
    id_ = create(store, "milter", {"hostname": "mail.example.com"})
    assert id_.startswith("api-")
    record = store.find("milter", id_)
    assert record is not None
    assert record.filter.name == id_


def test_the_state_changes_with_every_change_and_only_then(store: FilterStore) -> None:
    """A digest: stable while nothing changes, different after a change, per kind."""
    before = store.state("milter"), store.state("hook")
    assert store.state("milter") == before[0]
    create(store, "milter", {"name": "one", "hostname": "h"})
    assert store.state("milter") != before[0]
    assert store.state("hook") == before[1]
    again = FilterStore.open(config(), state_file=store.state_file)
    assert again.state("milter") == store.state("milter")


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "document", "properties", "text"),
    [
        ("milter", {"hostname": "h", "port": 0}, ["port"], "port: Expected `int` >= 1"),
        ("milter", {"hostname": "h", "port": "x"}, ["port"], "Expected `int`, got `str`"),
        ("milter", {"hostname": "h", "colour": 1}, ["colour"], "unknown field `colour`"),
        ("milter", {"hostname": "h", "timeoutData": "3x"}, ["timeoutData"], "invalid duration"),
        ("milter", {"hostname": "h", "stages": ["data", "data"]}, ["stages/1"], "listed twice"),
        ("milter", {"hostname": "h", "stages": ["nope"]}, ["stages/0"], "Invalid enum value"),
        ("milter", {"port": 1}, ["hostname", "unixPath"], "missing hostname"),
        ("milter", {"hostname": "h", "name": "a b"}, ["name"], "matching regex"),
        (
            "milter",
            {"hostname": "h", "enable": {"else": "nope("}},
            ["enable/else"],
            "enable/else: ",
        ),
        (
            "milter",
            {"hostname": "h", "enable": {"else": "true", "match": [{"if": "x(", "then": "t"}]}},
            ["enable/match/0/if"],
            "^",
        ),
        ("hook", {}, ["url"], "missing required field `url`"),
        ("hook", {"url": "ftp://x"}, ["url"], "expected an http:// or https:// URL"),
        ("hook", {"url": "http://x", "httpHeaders": {"a b": "1"}}, ["httpHeaders/a b"], "header"),
        ("hook", {"url": "http://x", "httpHeaders": {"a": 1}}, ["httpHeaders"], "Expected `str`"),
        (
            "hook",
            {"url": "http://x", "httpAuth": {"@type": "Bearer"}},
            ["httpAuth/bearerToken"],
            "missing required field",
        ),
        (
            "hook",
            {"url": "http://x", "httpAuth": {"@type": "Digest"}},
            ["httpAuth/@type"],
            "Invalid value 'Digest'",
        ),
        (
            "hook",
            {
                "url": "http://x",
                "httpAuth": {
                    "@type": "Bearer",
                    "bearerToken": {
                        "@type": "EnvironmentVariable",
                        "variableName": "MILTERBRIDGE_TEST_UNSET_VARIABLE",
                    },
                },
            },
            ["httpAuth/bearerToken/variableName"],
            "MILTERBRIDGE_TEST_UNSET_VARIABLE is not set",
        ),
        (
            "hook",
            {
                "url": "http://x",
                "httpAuth": {
                    "@type": "Basic",
                    "username": "u",
                    "secret": {"@type": "File", "filePath": "/nonexistent/secret"},
                },
            },
            ["httpAuth/secret/filePath"],
            "cannot read /nonexistent/secret",
        ),
    ],
)
def test_invalid_objects_name_the_offending_property(
    store: FilterStore, kind: Any, document: dict[str, Any], properties: list[str], text: str
) -> None:
    """Every check of the config file applies, and the failure names the property as a path."""
    problem = failure(kind, document, store)
    assert problem.type == "invalidProperties"
    assert problem.properties == properties
    assert text in problem.description
    assert " - at `$" not in problem.description


def test_names_are_unique_across_kinds_and_sources(store: FilterStore) -> None:
    """A name used by a config filter, or by an API filter of the other kind, is taken."""
    for kind, document in [
        ("milter", {"name": "rspamd", "hostname": "h"}),
        ("milter", {"name": "policy", "hostname": "h"}),
        ("hook", {"name": "rspamd", "url": "http://x"}),
    ]:
        problem = failure(kind, document, store)
        assert (problem.type, problem.properties) == ("invalidProperties", ["name"])
        assert "config file's" in problem.description
    create(store, "hook", {"name": "mine", "url": "http://x"})
    problem = failure("milter", {"name": "mine", "hostname": "h"}, store)
    assert "API filter" in problem.description


def test_one_draft_sees_its_own_earlier_changes(store: FilterStore) -> None:
    """A name freed by a rename in the same draft can be taken by a later create."""
    id_ = create(store, "milter", {"name": "old", "hostname": "h"})
    draft = store.draft("milter")
    with pytest.raises(SetFailure):
        draft.create({"name": "old", "hostname": "h2"})
    draft.replace(id_, {**draft.document(id_), "name": "new"})
    draft.create({"name": "old", "hostname": "h2"})
    store.commit(draft)
    assert [m.name for m in store.filters()[0]] == ["rspamd", "new", "old"]


def test_config_filters_cannot_be_changed_or_destroyed(store: FilterStore) -> None:
    """forbidden, naming the way to change them; an unknown id is notFound."""
    draft = store.draft("milter")
    for operation in (
        lambda: draft.document("config-rspamd"),
        lambda: draft.replace("config-rspamd", {"hostname": "h"}),
        lambda: draft.destroy("config-rspamd"),
    ):
        with pytest.raises(SetFailure) as info:
            operation()
        assert info.value.type == "forbidden"
        assert "config file" in info.value.description
    with pytest.raises(SetFailure) as info:
        draft.destroy("api-00000000")
    assert info.value.type == "notFound"


# --- the state file -------------------------------------------------------------------------------


def test_changes_are_written_and_loaded_at_the_next_start(
    store: FilterStore, state_file: Path
) -> None:
    """The file is versioned JSON with ids, mode 0600 (it may hold secrets); a new store built
    from it has the same filters, ids and order."""
    milter = create(store, "milter", {"name": "m", "hostname": "10.0.0.9", "timeoutData": "2m"})
    hook = create(
        store,
        "hook",
        {
            "name": "h",
            "url": "https://example.org/hook",
            "httpAuth": {"@type": "Bearer", "bearerToken": {"@type": "Value", "secret": "s3"}},
        },
    )
    document = json.loads(state_file.read_text())
    assert document["version"] == STATE_VERSION
    assert [entry["id"] for entry in document["milters"]] == [milter]
    assert document["milters"][0]["filter"]["timeoutData"] == "120s"
    assert document["hooks"][0]["id"] == hook
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert sorted(os.listdir(state_file.parent)) == [state_file.name]  # no temporary left
    again = FilterStore.open(config(), state_file=state_file)
    assert again.records("milter") == store.records("milter")
    assert again.records("hook") == store.records("hook")
    loaded = again.find("hook", hook)
    assert loaded is not None
    assert isinstance(loaded.filter, HookFilter)


def test_a_missing_state_file_is_empty(state_file: Path) -> None:
    store = FilterStore.open(config(), state_file=state_file)
    assert [r.id for r in store.records("milter")] == ["config-rspamd"]
    assert not state_file.exists()


def test_the_path_comes_from_the_config(tmp_path: Path) -> None:
    """[admin] stateFile is where open() looks by default."""
    path = tmp_path / "state.json"
    write_state(
        path,
        {"version": 1, "milters": [{"id": "api-1", "filter": {"name": "x", "hostname": "h"}}]},
    )
    text = CONFIG_TEXT + f'\n[admin]\nstateFile = "{path}"\n'
    store = FilterStore.open(parse_config(text, Path("c.toml")))
    assert store.state_file == path
    assert [m.name for m in store.filters()[0]] == ["rspamd", "x"]


def test_a_missing_directory_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "filters.json"
    with pytest.raises(ConfigError, match=r"directory .*nope does not exist"):
        FilterStore.open(config(), state_file=path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "malformed"),
        ("", "truncated"),
        ('{"milters": []}', "missing required field `version`"),
        ('{"version": 2}', "state file version 2; this milterbridge reads version 1"),
        ('{"version": 1, "extra": 1}', "unknown field `extra`"),
        (
            '{"version": 1, "milters": [{"id": "api-1", "filter": {"name": "x", "port": 1}}]}',
            "milters[0].filter: missing hostname",
        ),
        (
            '{"version": 1, "milters": [{"id": "api-1", "filter": '
            '{"name": "x", "hostname": "h", "port": 0}}]}',
            "milters[0].filter.port: Expected `int` >= 1",
        ),
        (
            '{"version": 1, "hooks": [{"id": "config-x", "filter": {"name": "x", "url": "http://h"}}]}',
            "hooks[0].id: 'config-x' is not an API filter id",
        ),
        (
            '{"version": 1, "hooks": [{"id": "a", "filter": {"name": "x", "url": "http://h"}}], '
            '"milters": [{"id": "a", "filter": {"name": "y", "hostname": "h"}}]}',
            "hooks[0].id: duplicate id 'a'",
        ),
        (
            '{"version": 1, "hooks": [{"id": "a", "filter": {"name": "rspamd", "url": "http://h"}}]}',
            "hooks[0].filter.name: duplicate filter name 'rspamd' "
            "(also the config file's milter[0])",
        ),
    ],
)
def test_a_broken_state_file_stops_the_start_naming_the_file(
    state_file: Path, content: str, message: str
) -> None:
    """Silently dropping filters would silently change mail flow: refuse, like a bad config."""
    state_file.write_text(content)
    with pytest.raises(ConfigError) as info:
        FilterStore.open(config(), state_file=state_file)
    assert str(info.value).startswith(f"{state_file}: ")
    assert message in str(info.value)


def test_a_failed_write_changes_nothing(store: FilterStore, state_file: Path) -> None:
    """The file cannot be written (its directory is gone): StoreWriteError, the store and the
    listeners untouched."""
    before = store.records("milter")
    calls: list[None] = []
    store.on_change.append(lambda: calls.append(None))
    state_file.parent.rmdir()
    draft = store.draft("milter")
    draft.create({"name": "m", "hostname": "h"})
    with pytest.raises(StoreWriteError, match=f"cannot write {state_file}"):
        store.commit(draft)
    assert store.records("milter") == before
    assert calls == []


def test_a_stale_draft_is_refused(store: FilterStore) -> None:
    first, second = store.draft("milter"), store.draft("milter")
    first.create({"name": "a", "hostname": "h"})
    second.create({"name": "b", "hostname": "h"})
    store.commit(first)
    with pytest.raises(ValueError, match="stale draft"):
        store.commit(second)


def test_without_a_state_file_changes_stay_in_memory() -> None:
    """No stateFile (only read permissions are allowed then): the store still works."""
    store = FilterStore.open(config())
    assert store.state_file is None
    create(store, "milter", {"name": "m", "hostname": "h"})
    assert [m.name for m in store.filters()[0]] == ["rspamd", "m"]


# --- notification and reload ----------------------------------------------------------------------


def test_on_change_runs_once_per_commit_and_not_for_nothing(store: FilterStore) -> None:
    """Callbacks see the new filters; a broken one is logged and does not stop the others."""
    seen: list[list[str]] = []

    def broken() -> None:
        raise RuntimeError("boom")

    store.on_change.append(broken)
    store.on_change.append(lambda: seen.append([m.name for m in store.filters()[0]]))
    draft = store.draft("milter")
    draft.create({"name": "a", "hostname": "h"})
    draft.create({"name": "b", "hostname": "h"})
    with capture_logs() as logs:
        store.commit(draft)
    assert seen == [["rspamd", "a", "b"]]
    assert [entry["event"] for entry in logs] == ["admin_change_callback_failed"]
    store.commit(store.draft("milter"))  # nothing changed: no write, no call
    assert len(seen) == 1


def test_reload_takes_new_config_filters_and_refuses_a_name_clash(store: FilterStore) -> None:
    """On reload the config file's filters are replaced, the API's kept; a new config filter
    taking an API filter's name is a ConfigError and nothing changes."""
    create(store, "milter", {"name": "mine", "hostname": "h"})
    new = parse_config(
        '[[milter]]\nname = "clamav"\nhostname = "10.0.0.3"\n', Path("/etc/milterbridge.toml")
    )
    store.reload(new)
    first = store.records("milter")[0]
    assert (first.id, first.filter.name) == ("config-clamav", "clamav")
    assert [m.name for m in store.filters()[0]] == ["clamav", "mine"]
    assert store.filters()[1] == []
    clash = parse_config('[[hook]]\nname = "mine"\nurl = "http://h"\n', Path("c.toml"))
    with pytest.raises(ConfigError, match="duplicate filter name 'mine'"):
        store.reload(clash)
    assert [m.name for m in store.filters()[0]] == ["clamav", "mine"]


def test_another_writer_is_never_undone(store: FilterStore, state_file: Path) -> None:
    """Two stores over one file (two worker processes): the second one's commit is refused
    until a reload has read what the first wrote; then both changes are kept."""
    other = FilterStore.open(config(), state_file=state_file)
    create(store, "milter", {"name": "first", "hostname": "h"})
    draft = other.draft("milter")
    draft.create({"name": "second", "hostname": "h"})
    with pytest.raises(StoreWriteError, match="changed by another process"):
        other.commit(draft)
    assert [m.name for m in other.filters()[0]] == ["rspamd"]
    other.reload(config())
    assert [m.name for m in other.filters()[0]] == ["rspamd", "first"]
    create(other, "milter", {"name": "second", "hostname": "h"})
    again = FilterStore.open(config(), state_file=state_file)
    assert [m.name for m in again.filters()[0]] == ["rspamd", "first", "second"]


def test_reload_of_a_broken_state_file_changes_nothing(
    store: FilterStore, state_file: Path
) -> None:
    create(store, "milter", {"name": "kept", "hostname": "h"})
    state_file.write_text("{")
    with pytest.raises(ConfigError, match=str(state_file)):
        store.reload(config())
    assert [m.name for m in store.filters()[0]] == ["rspamd", "kept"]


def test_reload_without_a_state_file() -> None:
    store = FilterStore.open(config())
    create(store, "hook", {"name": "mem", "url": "http://h"})
    store.reload(parse_config("", Path("c.toml")))
    assert [h.name for h in store.filters()[1]] == ["mem"]
    with pytest.raises(ConfigError, match=r"API filters: hooks\[0\]\.filter\.name"):
        store.reload(parse_config('[[milter]]\nname = "mem"\nhostname = "h"\n', Path("c.toml")))


def test_filters_are_the_config_types(store: FilterStore) -> None:
    create(store, "milter", {"name": "a", "hostname": "h"})
    milters, hooks = store.filters()
    assert all(isinstance(m, MilterFilter) for m in milters)
    assert all(isinstance(h, HookFilter) for h in hooks)
