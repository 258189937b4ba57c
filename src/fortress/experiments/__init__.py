"""`fortress experiment SPEC.toml --out DIR` and `fortress report DIR`: grids of runs from a spec file.

Three steps, each a module, data flowing one way (spec -> runner -> report); none imports the CLI:

  spec.py    read and check a spec file, expand it into cells (one `fortress` command each) and the
             table entries they fill
  runner.py  run a plan's cells: resumable, in parallel, sharded over machines, within a time budget;
             each finished cell leaves a small summary.json
  report.py  DIR/report.md from the summaries alone (mean ± std tables, sensitivity plots, figures,
             every cell's command); `publish` copies the summaries to a folder to commit
"""
