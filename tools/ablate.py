#!/usr/bin/env python
"""The DA paper's ablations and attention comparisons over several seeds, with tables that show
how sure each difference is (mean ± std, paired difference to the plain ResNet with a 95% t
interval).

    # Table I: orders of the spatial and channel branches (ResNet50), 3 seeds
    python tools/ablate.py --suite order --seeds 3 --output-dir runs/table1
    # Tables II/III: plain, SE, SGE, ECA, DA, CBAM at four depths, one run per GPU
    python tools/ablate.py --suite attention --depths 18,34,50,101 --gpus 0,1,2,3 \\
        --output-dir runs/table2
    # the LGA paper's Table 4: ResNet18 plain and with one module at the end of the backbone
    python tools/ablate.py --suite lga --seeds 3 --output-dir runs/lga_table4
    # any backbones, on the demo data, CPU
    python tools/ablate.py --config configs/demo.yaml --backbones resnet18,da_resnet18 \\
        --seed-list 0,5,9 --output-dir runs/demo_ablation iters=100 lr_steps=[67,83]
    # on a SLURM cluster: one job per run (one GPU each), waits and writes the tables
    python tools/ablate.py --suite attention --seeds 5 --output-dir runs/table2 \\
        --launcher slurm --partition gpu --time-limit 240 --account myproj
    # submit and return; then ask where the runs stand (the tables once all are done)
    python tools/ablate.py --suite order --seeds 5 --output-dir runs/table1 --launcher slurm \\
        --no-wait
    python tools/ablate.py --status --output-dir runs/table1

The tool itself: ssd_da/cli/ablate.py (``--help`` shows everything).
"""
from ssd_da.cli.ablate import script

if __name__ == "__main__":
    script()
