"""``ckptbridge gate``: one command for CI that converts, round-trips and aligns a checkpoint
against thresholds read from a YAML/TOML file, and reports in JSON and JUnit XML.

Modules, one job each:

* :mod:`.config`  -- read the file, validate ``source``/``report`` and every key (unknown = error)
* :mod:`.steps`   -- the step registry; one module per step (``convert``, ``roundtrip``,
  ``align``, ``converge``), each with its config parser and its run function
* :mod:`.context` -- what the steps share (the source, the work folder, the checkpoints under test)
* :mod:`.runner`  -- resolve the source, run the steps in order, turn step errors into failed checks
* :mod:`.results` -- the check record, console lines, summary.json, junit.xml
* :mod:`.cli`     -- the click command
"""
