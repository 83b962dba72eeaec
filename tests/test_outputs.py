"""A results file that several benchmark runs fill together (``mops.outputs.SharedResults``)."""

import json
import multiprocessing

from mops.outputs import SharedResults


def _render(results, path):
    path.with_suffix(".md").write_text("\n".join(sorted(results["cells"])) + "\n")


def _save_cells(path, name, n):
    shared = SharedResults(path, {"cells": {}, "by": name}, "cells", _render)
    for i in range(n):
        shared.save(f"{name}/{i}", {"ppl": float(i)})


def test_two_runs_that_share_a_file_keep_each_others_entries(tmp_path):
    path = tmp_path / "study.json"
    a = SharedResults(path, {"cells": {}}, "cells", _render)
    b = SharedResults(path, {"cells": {}}, "cells", _render)
    a.save("3:4/mops", {"ppl": 1.0})
    assert b.has("3:4/mops")  # b skips what a finished
    b.save("2:4/mops", {"ppl": 2.0})
    a.save("3:4/single", {"ppl": 3.0})
    assert set(json.loads(path.read_text())["cells"]) == {"3:4/mops", "2:4/mops", "3:4/single"}
    assert path.with_suffix(".md").read_text().split() == ["2:4/mops", "3:4/mops", "3:4/single"]  # redrawn


def test_this_runs_own_fields_and_entries_win(tmp_path):
    path = tmp_path / "study.json"
    SharedResults(path, {"cells": {"k": {"ppl": 1.0}}, "note": "old"}, "cells", _render).redraw()
    mine = SharedResults(path, {"cells": {"k": {"ppl": 2.0}}, "note": "new"}, "cells", _render)
    mine.redraw()
    assert json.loads(path.read_text()) == {"cells": {"k": {"ppl": 2.0}}, "note": "new"}


def test_processes_saving_at_once_lose_nothing(tmp_path):
    path = tmp_path / "study.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_save_cells, args=(path, name, 20)) for name in ("a", "b", "c")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers)
    assert len(json.loads(path.read_text())["cells"]) == 60
