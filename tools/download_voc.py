#!/usr/bin/env python
"""Download PASCAL VOC2007 trainval, VOC2007 test and VOC2012 trainval into a VOCdevkit folder.

    python tools/download_voc.py                                  # all three into data/VOCdevkit
    python tools/download_voc.py --sets voc07_trainval,voc07_test # VOC2007 only
    python tools/download_voc.py --mirror https://pjreddie.com/media/files

The tool itself: ssd_da/cli/download_voc.py (``--help`` shows everything).
"""
from ssd_da.cli.download_voc import script

if __name__ == "__main__":
    script()
