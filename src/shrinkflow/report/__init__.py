"""`shrinkflow report`: read results/summary.csv, choose a model under the accuracy budget, and
write results/report/ (index.html with embedded figures, report.md, the PNGs).

- table.py      load and check the summary; derive labels, accuracy drops and the Pareto front
- selection.py  the smallest (and fastest) artefact within ``report.max_accuracy_drop``
- plots.py      the figures (matplotlib, no display)
- render.py     index.html and report.md (Jinja2 templates in templates/)

No framework is imported here: the report reads numbers, never models.
"""
