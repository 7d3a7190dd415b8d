# quantdiff: model → calibrate → export → engine → bench, from config/config.yaml.
# The config is validated (defaults filled in) before any job is scheduled.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/engine.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/study.smk"


rule all:
    input:
        all_targets,
    default_target: True
