"""An instrumentor patches its framework when the application imports it, never before.

Each test runs in a fresh interpreter, where the framework is not imported yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import HOLD_A_LOCK
from tests.instrumentation import require

_REPO = Path(__file__).parents[2]


def _run(code: str, *, pythonpath: Path | None = None) -> tuple[dict[str, object], str]:
    env = dict(os.environ)
    env["INFERSCOPE_RECORDER"] = "off"
    paths = [str(pythonpath)] if pythonpath is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(_REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_the_framework_is_patched_when_the_application_imports_it() -> None:
    require("sklearn")
    report, _ = _run(
        """
        import json, sys
        import numpy as np
        import inferscope
        from inferscope.instrumentation.sklearn import SklearnInstrumentor

        instrumentor = SklearnInstrumentor()
        instrumentor.instrument()
        before = {"imported": "sklearn" in sys.modules, "waiting": instrumentor.waiting,
                  "patched": len(instrumentor.patched)}

        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression().fit(np.arange(20.0).reshape(10, 2), [0, 1] * 5)
        for _ in range(3):
            model.predict(np.ones((4, 2)))
        row = inferscope.snapshot().row("LogisticRegression")
        print(json.dumps({"before": before, "waiting": instrumentor.waiting,
                          "patched": len(instrumentor.patched), "calls": row.count}))
        """
    )
    assert report["before"] == {"imported": False, "waiting": True, "patched": 0}
    assert report["waiting"] is False and report["patched"] > 0
    assert report["calls"] == 3


def test_uninstrumented_before_the_import_nothing_is_patched_and_instrument_patches_at_once() -> None:
    require("sklearn")
    report, _ = _run(
        """
        import json
        import numpy as np
        import inferscope
        from inferscope.instrumentation.sklearn import SklearnInstrumentor

        instrumentor = SklearnInstrumentor()
        instrumentor.instrument()
        instrumentor.uninstrument()

        from sklearn.linear_model import LogisticRegression

        after_import = {"active": instrumentor.active, "patched": len(instrumentor.patched)}
        model = LogisticRegression().fit(np.arange(20.0).reshape(10, 2), [0, 1] * 5)
        model.predict(np.ones((4, 2)))
        unrecorded = [r.model for r in inferscope.snapshot().rows]
        instrumentor.instrument()  # sklearn is imported now: patched at once
        model.predict(np.ones((4, 2)))
        print(json.dumps({"after_import": after_import, "unrecorded": unrecorded,
                          "waiting": instrumentor.waiting, "patched": len(instrumentor.patched),
                          "calls": inferscope.snapshot().row("LogisticRegression").count}))
        """
    )
    assert report["after_import"] == {"active": False, "patched": 0}
    assert report["unrecorded"] == []
    assert report["waiting"] is False and report["patched"] > 0
    assert report["calls"] == 1


def test_a_bad_option_is_refused_before_the_framework_is_imported() -> None:
    require("sklearn")
    report, _ = _run(
        """
        import json, sys
        from inferscope.instrumentation.sklearn import SklearnInstrumentor

        error = None
        try:
            SklearnInstrumentor().instrument(stages="yes")
        except TypeError as exc:
            error = str(exc)
        print(json.dumps({"error": error, "imported": "sklearn" in sys.modules,
                          "active": SklearnInstrumentor().active}))
        """
    )
    assert report == {"error": "stages must be True or False, got 'yes'", "imported": False, "active": False}


def test_a_framework_that_cannot_be_patched_never_breaks_the_applications_import(tmp_path: Path) -> None:
    require("sklearn")  # its metadata passes the dependency check; the module found first is broken
    broken = tmp_path / "broken"
    (broken / "sklearn").mkdir(parents=True)
    (broken / "sklearn" / "__init__.py").write_text("VERSION = 'a build without sklearn.base'\n")
    report, stderr = _run(
        """
        import json
        from inferscope.instrumentation.sklearn import SklearnInstrumentor

        instrumentor = SklearnInstrumentor()
        instrumentor.instrument()
        import sklearn

        print(json.dumps({"imported": sklearn.VERSION, "active": instrumentor.active,
                          "waiting": instrumentor.waiting}))
        """,
        pythonpath=broken,
    )
    assert report == {"imported": "a build without sklearn.base", "active": False, "waiting": False}
    assert stderr.count("inferscope: sklearn could not be instrumented; its calls are not recorded") == 1


def test_a_child_forked_while_another_thread_patches_can_instrument() -> None:
    require("sklearn")
    report, _ = _run(
        HOLD_A_LOCK
        + textwrap.dedent(
            """
        import faulthandler, json, os
        from inferscope import instrumentation
        from inferscope.instrumentation.sklearn import SklearnInstrumentor

        thread = hold(instrumentation.attach_lock(SklearnInstrumentor))  # as an import hook does
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(60, exit=True)  # a hang says where
            instrumentor = SklearnInstrumentor()
            instrumentor.instrument()
            import sklearn.linear_model

            os.write(write, json.dumps({"patched": len(instrumentor.patched) > 0}).encode())
            os._exit(0)
        release.set()
        thread.join()
        _, status = os.waitpid(pid, 0)
        os.close(write)
        print(json.dumps({"child": json.loads(os.read(read, 1024) or b"null"), "status": status}))
        """
        )
    )
    assert report == {"child": {"patched": True}, "status": 0}
