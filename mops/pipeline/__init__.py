"""``mops-run``: one recipe from a dense model to a recovered one and a report.

- ``recipe`` (with ``yaml12``, ``recipe_errors``): the recipe's schema, read as YAML 1.2,
  and its one-line errors;
- ``world``: the recipe checked against the model and data it names;
- ``plan``, ``cache``, ``fingerprints``: the stages, their keys, the stage cache;
- ``prune_stage``, ``recover_stage``, ``eval_stage`` (with ``measures``, ``harness``) and
  ``report`` (with ``table``, ``charts``, ``html_page``, ``commands``): what each stage does,
  through the stages' Python APIs, never their command lines;
- ``trackers``: ``--report-to tensorboard|mlflow``;
- ``runner`` and ``cli``: the command.

The stages never import this package: it sits on top of them.
"""
