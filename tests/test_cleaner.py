"""The cleaner: loss ranking, moves that are exactly the ones asked for, undo, the log, and path tricks refused."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from conftest import BEARS, Client, PY, ROOT, run, served, write_image
from imagelab import UserError
from imagelab.cleaning import Cleaner
from imagelab.inference import Predictor

CLASSES = [label for label, _ in BEARS]
BAD = ("empty.jpg", "notes.jpg", "truncated.jpg")
NOT_UTF8 = os.fsdecode(b"\xff\xfebad.jpg")  # a name a disk holds (a scrape, an old archive) that JSON cannot carry


@pytest.fixture
def dataset(tiny_bears, tmp_path):
    """A copy of the trained-on folder (the cleaner moves files), a file outside it and a link to that file, and an
    image whose name is not UTF-8."""
    model, data, _ = tiny_bears
    root = shutil.copytree(data, tmp_path / "data")
    shutil.copy(root / "black" / "00000000.jpg", root / "black" / NOT_UTF8)
    secret = write_image(tmp_path / "secret.jpg", (1, 2, 3))
    (root / "grizzly" / "link.jpg").symlink_to(secret)
    return model, root, secret


def snapshot(root):
    """Every file under `root` with a hash of its content: what moved, and that nothing changed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != "cleaning-log.jsonl"}


def test_images_are_ranked_by_loss_per_class_and_split(dataset):
    model, root, _ = dataset
    shutil.copy(root / "teddy" / "00000000.jpg", root / "teddy" / "back\\slash.jpg")  # a name apply would refuse
    cleaner = Cleaner(model, root)
    assert cleaner.classes == CLASSES and cleaner.splits == ["valid", "train", "all", "flagged"]
    split = json.loads(model.with_name("bears.report").joinpath("split.json").read_text())
    predictor, wrong = Predictor(model), 0
    for label in CLASSES:
        everything = cleaner.rank(label, "all")
        files = sorted(f"{label}/{p.name}" for p in (root / label).iterdir()
                       if p.name not in BAD + ("link.jpg", NOT_UTF8, "back\\slash.jpg"))
        assert sorted(r["file"] for r in everything) == files  # no unreadable file, no link, no name to refuse
        odd = {"black": "black/\\xff\\xfebad.jpg", "teddy": "teddy/back\\slash.jpg"}.get(label)
        assert cleaner.unlisted(label) == (f"1 file left out ({odd}): a name that is not valid UTF-8 (or holds a "
                                           "backslash) cannot be sent back from the page; rename it to clean it here"
                                           if odd else "")
        assert [r["loss"] for r in everything] == sorted((r["loss"] for r in everything), reverse=True)
        for r in everything:
            probs = predictor.predict(root / r["file"], k=len(CLASSES))
            assert r["label"] == label and r["predicted"] == max(probs, key=probs.get)
            assert r["probability"] == pytest.approx(max(probs.values()), abs=1e-4)
            # cross-entropy, the training loss: -log of the probability of the true class, not the predicted one
            assert r["loss"] == pytest.approx(-math.log(probs[label]), abs=2e-3)
            wrong += r["predicted"] != label
        for name in ("valid", "train"):
            assert sorted(r["file"] for r in cleaner.rank(label, name)) == sorted(
                f for f in split[name] if f.startswith(label + "/"))
        assert cleaner.rank(label, "all", limit=3) == everything[:3]
    assert wrong  # the tiny model gets some wrong: there the loss is not that of the predicted class
    with pytest.raises(UserError, match="not a class of this model"):
        cleaner.rank("../grizzly")
    with pytest.raises(UserError, match="split must be"):
        cleaner.rank("teddy", "test")
    with pytest.raises(UserError, match="limit must be a number of images, 0 for all"):
        cleaner.rank("teddy", "all", limit=-3)
    elsewhere = root.parent / "elsewhere"
    write_image(elsewhere / "cats" / "c.jpg", (220, 60, 60))
    with pytest.raises(UserError, match="no folder named after a class of the model"):
        Cleaner(model, elsewhere)  # not the folder the model was trained on
    by_name = root.parent / "by_name"  # labelled by file names: a flagged image would have no class folder to go to
    write_image(by_name / "grizzly_1.jpg", (220, 60, 60))
    write_image(by_name / "flagged" / "grizzly" / "0a1b2c3d4e5f6a7b.jpg", (220, 60, 60))
    with pytest.raises(UserError, match="no folder named after a class of the model"):
        Cleaner(model, by_name)
    linked = root.parent / "linked"  # training reads through links; the cleaner moves files only where they are
    linked.mkdir()
    for label in CLASSES:
        (linked / label).symlink_to(root / label, target_is_directory=True)
    with pytest.raises(UserError, match="is a link to a folder elsewhere: clean the folder it links to"):
        Cleaner(model, linked)


def test_a_log_line_cut_short_is_passed_over(dataset):
    """A crash or a full disk in the middle of logging a batch leaves half a line: the rest still undoes."""
    model, root, _ = dataset
    cleaner = Cleaner(model, root)
    before = snapshot(root)
    first = cleaner.apply([{"file": "grizzly/00000003.webp", "action": "remove"}])
    with open(root / "cleaning-log.jsonl", "a") as log:
        log.write('{"batch": 2, "kind": "clean", "moves": [')  # cut short
    second = cleaner.apply([{"file": "teddy/00000000.jpg", "action": "relabel", "to": "black"}])
    assert cleaner.undo() == [{"from": m["to"], "to": m["from"]} for m in second]
    assert cleaner.undo() == [{"from": m["to"], "to": m["from"]} for m in first]
    assert snapshot(root) == before


DAMAGED = {  # JSON lines that no cleaner wrote (edited by hand, say), and what undo says of each
    "a move without to": ({"batch": 2, "kind": "clean", "moves": [{"from": "grizzly/00000003.webp"}]},
                          "its moves are not each a 'from' and a 'to'"),
    "a move that is a string": ({"batch": 2, "kind": "clean", "moves": ["grizzly/00000003.webp"]},
                                "its moves are not each a 'from' and a 'to'"),
    "an undo of a list": ({"batch": 2, "kind": "undo", "undoes": [1], "moves": []},
                          "neither a clean nor the undo of a numbered batch"),
    "no moves": ({"batch": 2, "kind": "clean"}, "its moves are not each a 'from' and a 'to'"),
    "a batch named": ({"batch": "two", "kind": "clean", "moves": []}, "not a numbered batch"),
    "not an object": ([1, 2], "not a numbered batch"),
}


@pytest.mark.parametrize("damaged", DAMAGED)
def test_a_damaged_log_line_is_named_in_one_line_and_the_rest_is_kept(dataset, damaged):
    model, root, _ = dataset
    cleaner = Cleaner(model, root)
    before = snapshot(root)
    first = cleaner.apply([{"file": "grizzly/00000003.webp", "action": "remove"}])
    log = root / "cleaning-log.jsonl"
    line, wrong = DAMAGED[damaged]
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
    message = (f"cannot undo: line 3 of {log} is damaged ({wrong}); put it right or delete it, then undo again (the "
               "other lines are as they were)")
    with pytest.raises(UserError) as refused:
        cleaner.undo()
    assert str(refused.value) == message
    second = cleaner.apply([{"file": "teddy/00000000.jpg", "action": "relabel", "to": "black"}])
    numbered = damaged not in ("a batch named", "not an object")
    assert json.loads(log.read_text().splitlines()[-1])["batch"] == (3 if numbered else 2)  # never the same number
    kept = log.read_text()
    with pytest.raises(UserError) as refused:
        cleaner.undo()
    assert str(refused.value) == message
    assert log.read_text() == kept and (root / "black" / "00000000_1.jpg").exists()  # nothing lost, nothing moved
    log.write_text("".join(x for x in kept.splitlines(keepends=True) if json.loads(x) != line))  # the user deletes it
    assert cleaner.undo() == [{"from": m["to"], "to": m["from"]} for m in second]
    assert cleaner.undo() == [{"from": m["to"], "to": m["from"]} for m in first]
    assert snapshot(root) == before


def test_apply_moves_exactly_the_chosen_files_and_undo_puts_them_back(dataset):
    model, root, _ = dataset
    cleaner = Cleaner(model, root)
    before = snapshot(root)
    moves = cleaner.apply([
        {"file": "grizzly/00000000.jpg", "action": "relabel", "to": "black"},  # black/00000000.jpg exists
        {"file": "grizzly/00000003.webp", "action": "remove"},
        {"file": "teddy/00000002.jpeg?width=3200&height=1680&fit=crop", "action": "relabel", "to": "grizzly"},
        {"file": "black/00000001.png", "action": "keep"},
        {"file": "black/00000004.jpg", "action": "relabel", "to": "black"},  # its own class: nothing to do
    ])
    assert moves == [{"from": "grizzly/00000000.jpg", "to": "black/00000000_1.jpg"},
                     {"from": "grizzly/00000003.webp", "to": "removed/grizzly/00000003.webp"},
                     {"from": "teddy/00000002.jpeg?width=3200&height=1680&fit=crop",  # taken too
                      "to": "grizzly/00000002_1.jpeg?width=3200&height=1680&fit=crop"}]
    after = snapshot(root)
    expected = dict(before)
    for m in moves:
        expected[m["to"]] = expected.pop(m["from"])
    assert after == expected  # those three files moved, contents intact; nothing else changed
    log = [json.loads(line) for line in (root / "cleaning-log.jsonl").read_text().splitlines()]
    # logged before the moves (what it is about to move), then after them (what it moved)
    assert [(b["batch"], b["kind"], b.get("planned")) for b in log] == [(1, "clean", True), (1, "clean", None)]
    assert log[0]["moves"] == log[1]["moves"] == moves
    # The removed file is out of the next training run and out of the cleaner's lists.
    assert "grizzly/00000003.webp" not in [r["file"] for r in cleaner.rank("grizzly")]

    undone = cleaner.undo()
    assert undone == [{"from": m["to"], "to": m["from"]} for m in reversed(moves)]
    assert snapshot(root) == before
    log = [json.loads(line) for line in (root / "cleaning-log.jsonl").read_text().splitlines()]
    assert [(b["batch"], b["kind"], b.get("undoes")) for b in log if not b.get("planned")] == [
        (1, "clean", None), (2, "undo", 1)]
    with pytest.raises(UserError, match="nothing to undo"):
        cleaner.undo()


KILLED_AFTER_RENAMES = """
import os, signal, sys
from imagelab.cleaning import Cleaner
from imagelab.inference import Predictor
model, root, action, renames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
how = sys.argv[5] if len(sys.argv) > 5 else "kill"
cleaner = Cleaner(model, root)
done = 0

def kill_after_renames(frame, event, arg):  # right after its n-th move: SIGKILL itself, as kill -9 would, or Ctrl-C
    global done
    if event == "c_return" and arg is os.rename:
        done += 1
        if done == renames:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.setprofile(None)
            raise KeyboardInterrupt

sys.setprofile(kill_after_renames)
if action == "apply":
    cleaner.apply([{"file": f"grizzly/{i}.jpg", "action": "remove"} for i in range(5)])
else:
    cleaner.undo()
"""


def test_a_server_killed_while_moving_files_leaves_a_log_that_undoes_them(dataset):
    """Ctrl-C or kill -9 on the cleaner's server in the middle of a batch: every file it moved is undone."""
    model, root, _ = dataset
    for i in range(5):
        write_image(root / "grizzly" / f"{i}.jpg", (120, 80, 40), seed=i)
    before = snapshot(root)
    killed = run(["-c", KILLED_AFTER_RENAMES, model, root, "apply", 3])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (root / "removed" / "grizzly").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    cleaner = Cleaner(model, root)
    cut_short = cleaner.history()
    assert [(b["batch"], b.get("cut_short")) for b in cut_short] == [(1, True)]
    assert [m["from"] for m in cut_short[0]["moves"]] == ["grizzly/0.jpg", "grizzly/1.jpg", "grizzly/2.jpg"]
    # an undo killed part way is finished by the next one
    killed = run(["-c", KILLED_AFTER_RENAMES, model, root, "undo", 2])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((root / "removed" / "grizzly").iterdir())) == 1
    assert [m["from"] for m in cleaner.undo()] == ["removed/grizzly/0.jpg"]
    assert snapshot(root) == before
    with pytest.raises(UserError, match="nothing to undo"):
        cleaner.undo()
    assert cleaner.apply([{"file": "grizzly/4.jpg", "action": "remove"}]) == [
        {"from": "grizzly/4.jpg", "to": "removed/grizzly/4.jpg"}]
    assert cleaner.history()[-1]["batch"] == 4  # after the killed batch, the killed undo and the undo



def test_an_undo_that_finds_its_files_back_still_undoes_its_batch(dataset):
    """An undo killed after its last move, or stopped part way by Ctrl-C: the next undo finishes it, and the one after
    undoes the batch before (they stopped at that batch for good)."""
    model, root, _ = dataset
    for i in range(5):
        write_image(root / "grizzly" / f"{i}.jpg", (120, 80, 40), seed=i)
    before = snapshot(root)
    cleaner = Cleaner(model, root)
    cleaner.apply([{"file": "grizzly/0.jpg", "action": "remove"}])
    cleaner.apply([{"file": f"grizzly/{i}.jpg", "action": "remove"} for i in (1, 2)])
    killed = run(["-c", KILLED_AFTER_RENAMES, model, root, "undo", 2])  # after both of its moves
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cleaner.undo() == []  # nothing left to move: its batch is undone all the same
    assert cleaner.undo() == [{"from": "removed/grizzly/0.jpg", "to": "grizzly/0.jpg"}]
    assert snapshot(root) == before
    cleaner.apply([{"file": f"grizzly/{i}.jpg", "action": "remove"} for i in (3, 4)])
    stopped = run(["-c", KILLED_AFTER_RENAMES, model, root, "undo", 1, "interrupt"])
    assert "KeyboardInterrupt" in stopped.stderr and len(list((root / "removed" / "grizzly").iterdir())) == 1
    assert [m["to"] for m in cleaner.undo()] == ["grizzly/3.jpg"]
    assert snapshot(root) == before


def waits_for_a_lock(proc, timeout=120):
    """Return once `proc` is blocked waiting for a file lock (Linux lists the waiters in /proc/locks, `->`)."""
    deadline = time.monotonic() + timeout
    while not any(line.split()[1] == "->" and line.split()[5] == str(proc.pid)
                  for line in Path("/proc/locks").read_text().splitlines()):
        assert proc.poll() is None, f"it ended ({proc.returncode}) instead of waiting"
        assert time.monotonic() < deadline, f"not waiting for a lock after {timeout} s"
        time.sleep(0.1)


def test_two_cleaners_on_one_folder_take_turns(dataset):
    """A second cleaner (another process) waits while one moves files: each batch has a number of its own."""
    model, root, _ = dataset
    for i in range(2):
        write_image(root / "grizzly" / f"{i}.jpg", (120, 80, 40), seed=i)
    cleaner = Cleaner(model, root)
    code = ("import sys; from imagelab.cleaning import Cleaner\n"
            "Cleaner(sys.argv[1], sys.argv[2]).apply([{'file': 'grizzly/1.jpg', 'action': 'remove'}])")
    with cleaner.locked():
        other = subprocess.Popen([PY, "-c", code, str(model), str(root)], cwd=ROOT)
        waits_for_a_lock(other)
        assert (root / "grizzly" / "1.jpg").exists()  # it waits before moving anything
        cleaner._move([(root / "grizzly" / "0.jpg", root / "removed" / "grizzly", None)], "clean")
    assert other.wait(timeout=60) == 0
    assert [(b["batch"], b["moves"][0]["from"]) for b in cleaner.history()] == [(1, "grizzly/0.jpg"),
                                                                                 (2, "grizzly/1.jpg")]


TRICKS = [
    "../secret.jpg", "/etc/passwd", "grizzly/../../secret.jpg", "grizzly/../black/00000000.jpg",
    "grizzly/..", "grizzly/.", "grizzly/link.jpg", "grizzly/%2e%2e%2fsecret.jpg", "grizzly/..%2f..%2fsecret.jpg",
    "grizzly\\..\\..\\secret.jpg", "grizzly/00000000.jpg\x00.png", "removed/black/r.jpg", "quarantine/grizzly/q.jpg",
    "grizzly//00000000.jpg", "./grizzly/00000000.jpg", "grizzly/00000000.jpg/", "grizzly/no-such.jpg",
    "grizzly", "", None, 42, ["grizzly", "00000000.jpg"],
    "flagged/../secret.jpg", "flagged/grizzly/../../secret.jpg", "flagged/quarantine/q.jpg", "removed/flagged/x.jpg",
    f"black/{NOT_UTF8}",  # there, but never listed: its name could not come back from the page (JSON's "\\udcff...")
]


@pytest.mark.parametrize("trick", TRICKS, ids=repr)
def test_path_tricks_are_refused(dataset, trick):
    model, root, secret = dataset
    cleaner = Cleaner(model, root)
    before, secret_bytes = snapshot(root), secret.read_bytes()
    for request in ([{"file": trick, "action": "remove"}],
                    [{"file": "black/00000004.jpg", "action": "remove"}, {"file": trick, "action": "remove"}]):
        with pytest.raises(UserError):
            cleaner.apply(request)
    with pytest.raises(UserError):
        cleaner.thumbnail(trick)
    assert snapshot(root) == before and secret.read_bytes() == secret_bytes
    assert not (root / "cleaning-log.jsonl").exists()


def linked(path, to):
    """`path` made a symbolic link to the folder `to` (created, after what `path` held is moved away)."""
    if path.exists():
        path.rename(path.with_name(f".{path.name}.away"))
    to.mkdir(parents=True, exist_ok=True)
    path.symlink_to(to, target_is_directory=True)


# Where a move goes, made a link or a file on the disk (by hand, by another tool, after the cleaner started): the
# destination and each of its folders pass the same checks as a source, and the whole batch is refused.
DESTINATION_TRICKS = {
    "removed links out": (lambda root, out: linked(root / "removed", out), {"file": "grizzly/00000000.jpg",
                                                                            "action": "remove"}),
    "removed/<class> links out": (lambda root, out: linked(root / "removed" / "grizzly", out),
                                  {"file": "grizzly/00000000.jpg", "action": "remove"}),
    "removed/<class> links to a class": (lambda root, out: linked(root / "removed" / "grizzly", root / "black"),
                                         {"file": "grizzly/00000000.jpg", "action": "remove"}),
    "class folder links out": (lambda root, out: linked(root / "black", out),
                               {"file": "grizzly/00000000.jpg", "action": "relabel", "to": "black"}),
    "removed is a file": (lambda root, out: shutil.rmtree(root / "removed") or (root / "removed").write_text("x"),
                          {"file": "grizzly/00000000.jpg", "action": "remove"}),
}


@pytest.mark.parametrize("trick", DESTINATION_TRICKS)
def test_destination_tricks_are_refused(dataset, tmp_path, trick):
    model, root, _ = dataset
    cleaner = Cleaner(model, root)  # before the trick: it started on a sound folder
    setup, entry = DESTINATION_TRICKS[trick]
    setup(root, tmp_path / "elsewhere")
    before = snapshot(root)
    with pytest.raises(UserError, match="^nothing moved: (refusing a symbolic link|not a folder)"):
        cleaner.apply([{"file": "teddy/00000000.jpg", "action": "relabel", "to": "grizzly"}, entry])
    assert snapshot(root) == before and not list((tmp_path / "elsewhere").rglob("*"))
    assert not (root / "cleaning-log.jsonl").read_text()  # nothing logged: nothing to undo
    with pytest.raises(UserError, match="nothing to undo"):
        cleaner.undo()


def test_targets_links_and_a_forged_log_are_refused(dataset, tmp_path):
    model, root, secret = dataset
    cleaner = Cleaner(model, root)
    before = snapshot(root)
    for to in ["../outside", "/tmp", "removed", "quarantine", "grizzly/..", "panda", "", None]:
        with pytest.raises(UserError):
            cleaner.apply([{"file": "black/00000004.jpg", "action": "relabel", "to": to}])
    for bad in [{"file": "black/00000004.jpg", "action": "delete"}, {"file": "black/00000004.jpg"}, "black/x.jpg",
                [{"file": "black/00000004.jpg", "action": "remove"}] * 2]:
        with pytest.raises(UserError):
            cleaner.apply(bad if isinstance(bad, list) else [bad])
    # A class folder that is a link to somewhere else is neither listed nor moved from.
    outside = tmp_path / "elsewhere"
    (root / "teddy").rename(outside)
    (root / "teddy").symlink_to(outside)
    assert cleaner.files("teddy") == []
    with pytest.raises(UserError, match="symbolic link"):
        cleaner.apply([{"file": "teddy/00000000.jpg", "action": "remove"}])
    # A log edited to point outside the dataset does not make undo move anything there.
    (root / "cleaning-log.jsonl").write_text(json.dumps(
        {"batch": 1, "kind": "clean", "moves": [{"from": "../stolen.jpg", "to": "black/00000004.jpg"}]}) + "\n")
    with pytest.raises(UserError):
        cleaner.undo()
    assert snapshot(root) == {k: v for k, v in before.items() if not k.startswith("teddy/")}
    assert not (tmp_path / "stolen.jpg").exists() and secret.exists()


def drain(queue):
    """What an asyncio queue holds now (a finished gradio_client job's updates: its warnings among them)."""
    while not queue.empty():
        yield queue.get_nowait()


def test_cleaner_app_over_http(dataset):
    model, root, secret = dataset
    with served(["apps/cleaner/app.py", "--model", model, "--data", root]) as url:
        client = Client(url, verbose=False)
        listed = client.predict("grizzly", "all", 4, api_name="/list")
        assert len(listed) == 4 and listed == sorted(listed, key=lambda r: -r["loss"])
        # a file named in bytes that are not UTF-8 is left out of its class's list, with a warning that says so
        job, cleaner = client.submit("black", "all", 0, api_name="/list"), Cleaner(model, root)
        assert sorted(r["file"] for r in job.result()) == sorted(r["file"] for r in cleaner.rank("black"))
        warnings = [u.log for u in drain(job.communicator.updates) if getattr(u, "log", None)]
        assert warnings == [(cleaner.unlisted("black"), "warning")] and "1 file left out" in warnings[0][0]
        before = snapshot(root)
        relabel, remove = listed[0]["file"], listed[1]["file"]
        moves = client.predict([{"file": relabel, "action": "relabel", "to": "teddy"},
                                {"file": remove, "action": "remove"},
                                {"file": listed[2]["file"], "action": "keep"}], api_name="/apply")
        assert moves[1:] == [{"from": remove, "to": f"removed/{remove}"}] and moves[0]["from"] == relabel
        assert moves[0]["to"].startswith("teddy/") and moves[0]["to"] not in before  # a free name in teddy/
        after = snapshot(root)
        assert set(before) - set(after) == {relabel, remove} and set(after) - set(before) == {m["to"] for m in moves}
        assert after[moves[0]["to"]] == before[relabel] and after[moves[1]["to"]] == before[remove]
        log = [json.loads(line) for line in (root / "cleaning-log.jsonl").read_text().splitlines()]
        assert log[-1]["moves"] == moves

        for trick in ["../secret.jpg", str(secret), "grizzly/link.jpg", "grizzly/../../secret.jpg"]:
            with pytest.raises(AppError, match="outside|not <class>/<file>|symbolic link|not a file name"):
                client.predict([{"file": trick, "action": "remove"}], api_name="/apply")
        with pytest.raises(AppError, match="not a class of this model"):
            client.predict("../..", "all", 0, api_name="/list")
        assert snapshot(root) == after and secret.exists()

        assert client.predict(api_name="/undo") == [{"from": m["to"], "to": m["from"]} for m in reversed(moves)]
        assert snapshot(root) == before
        with pytest.raises(AppError, match="nothing to undo"):
            client.predict(api_name="/undo")
