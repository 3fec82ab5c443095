"""The pretrained-weight loader (ssd_da/models/pretrained.py): local files in their wrappings,
torchvision's published files, depth checks, weights names through torch.hub (mocked: tests never
download) and what happens offline."""
import logging
from urllib.error import URLError

import pytest
import torch
import torchvision

from ssd_da.models.pretrained import infer_resnet_layout, load_pretrained, resolve_weights
from ssd_da.models.resnet import build_resnet


def _meta(name: str, **kw):
    """Build on the meta device: shapes without memory or init, so a check is cheap."""
    with torch.device("meta"):
        return build_resnet(name, **kw)


@pytest.fixture(scope="module")
def tv50(tmp_path_factory):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    path = tmp_path_factory.mktemp("w") / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


@pytest.fixture(scope="module")
def tv18(tmp_path_factory):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_load_into_da_resnet50(tv50):
    tv, path = tv50
    model = build_resnet("da_resnet50")
    report = load_pretrained(model, path)
    attn_keys = sorted(k for k in model.state_dict() if ".attn." in k)
    assert report.missing == attn_keys and len(attn_keys) == 16 * 3  # 3 DA convs x 16 blocks
    assert report.unexpected == []
    torch.testing.assert_close(model.layer3[5].conv2.weight, tv.layer3[5].conv2.weight)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module."])
def test_wrapped_state_dicts(tv18, tmp_path, wrap):
    tv, path = tv18
    sd = torch.load(path)
    if wrap == "module.":
        sd = {f"module.{k}": v for k, v in sd.items()}
    else:
        sd = {wrap: sd, "iteration": 3}
    torch.save(sd, tmp_path / "wrapped.pth")
    model = build_resnet("da_resnet18")
    report = load_pretrained(model, tmp_path / "wrapped.pth")
    assert len(report.missing) == 8 * 3 and report.unexpected == []
    torch.testing.assert_close(model.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)


def test_plain_resnet50_reproduces_torchvision(tv50):
    tv, path = tv50
    model = build_resnet("resnet50").eval()
    assert load_pretrained(model, path).missing == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))


def test_detector_form_reports_fc_unexpected(tv50, caplog):
    _, path = tv50
    model = build_resnet("da_resnet50", num_classes=None)
    with caplog.at_level(logging.INFO, logger="ssd_da.models.pretrained"):
        report = load_pretrained(model, path)
    assert report.unexpected == ["fc.bias", "fc.weight"]
    assert all(".attn." in k for k in report.missing)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_published_files_lack_num_batches_tracked(tv18, tmp_path):
    _, path = tv18
    sd = {k: v for k, v in torch.load(path).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "pub.pth")
    report = load_pretrained(build_resnet("resnet18"), tmp_path / "pub.pth")
    assert len(report.missing) == 20  # BN layers of ResNet18: 1 + 8 * 2 + 3 downsample
    assert all(k.endswith("num_batches_tracked") for k in report.missing)


@pytest.mark.parametrize("source,target,message", [
    ("resnet18", "da_resnet50",
     r"looks like a ResNet18 \(BasicBlock.*model is da_resnet50 \(depth 50"),
    ("resnet34", "resnet50",
     r"looks like a ResNet34 \(BasicBlock, blocks per stage \[3, 4, 6, 3\]"),
    ("resnet50", "se_resnet18", r"looks like a ResNet50 \(Bottleneck.*depth 18"),
])
def test_other_depth_is_rejected(tv18, tv50, tmp_path, source, target, message):
    if source == "resnet34":
        path = tmp_path / "resnet34.pth"
        torch.save(torchvision.models.resnet34().state_dict(), path)
    else:
        path = (tv18 if source == "resnet18" else tv50)[1]
    # The check runs before any tensor is copied, so a meta-device target is enough.
    with pytest.raises(ValueError, match=message):
        load_pretrained(_meta(target, num_classes=None), path)


def test_missing_key_shape_mismatch_and_bad_files(tv18, tmp_path):
    _, path = tv18
    sd = torch.load(path)
    del sd["layer1.0.bn1.weight"]
    torch.save(sd, tmp_path / "holey.pth")
    model = build_resnet("da_resnet18")
    with pytest.raises(ValueError, match=r"non-attention key.*layer1\.0\.bn1\.weight"):
        load_pretrained(model, tmp_path / "holey.pth")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"fc.weight: file \(10, 512\) vs model \(1000, 512\)"):
        load_pretrained(model, tmp_path / "ten.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a non-empty state dict"):
        load_pretrained(model, tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read it as a weights file"):
        load_pretrained(model, tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")


def test_infer_layout():
    with torch.device("meta"):
        sd50 = torchvision.models.resnet50().state_dict()
        sd101 = torchvision.models.resnet101().state_dict()
        sd18 = torchvision.models.resnet18().state_dict()
    assert infer_resnet_layout(sd50) == ("Bottleneck", (3, 4, 6, 3), 50)
    assert infer_resnet_layout(sd101) == ("Bottleneck", (3, 4, 23, 3), 101)
    assert infer_resnet_layout(sd18) == ("BasicBlock", (2, 2, 2, 2), 18)
    with pytest.raises(ValueError, match="does not look like a ResNet"):
        infer_resnet_layout({"conv1.weight": torch.zeros(1)})


def test_resolve_weights_names():
    W50, W18 = torchvision.models.ResNet50_Weights, torchvision.models.ResNet18_Weights
    assert resolve_weights(50, "DEFAULT") is W50.IMAGENET1K_V2
    assert resolve_weights(50, "ResNet50_Weights.IMAGENET1K_V1") is W50.IMAGENET1K_V1
    assert resolve_weights(18, "IMAGENET1K_V1") is W18.IMAGENET1K_V1
    with pytest.raises(ValueError,
                       match=r"unknown weights 'IMAGENET1K_V2' for ResNet18.*IMAGENET1K_V1"):
        resolve_weights(18, "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="are for ResNet18, but the model is a ResNet50"):
        resolve_weights(50, "ResNet18_Weights.IMAGENET1K_V1")


def test_weights_name_download_is_mocked(monkeypatch, tmp_path):
    """Named weights go through torch.hub (mocked here: tests never download)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []
    tv18 = torchvision.models.resnet18()

    def fake(url, **kw):
        calls.append((url, kw))
        return tv18.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    from ssd_da.models import pretrained

    monkeypatch.setattr(pretrained, "_check_reachable", lambda url: None)  # "online"
    model = build_resnet("da_resnet18", num_classes=None)
    report = load_pretrained(model, "DEFAULT")
    assert calls[0][0] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert calls[0][1]["check_hash"] is True
    assert report.unexpected == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.conv1.weight, tv18.conv1.weight)


def test_offline_weights_name_is_a_clear_error_printing_nothing(monkeypatch, tmp_path, capsys):
    """No network: the HEAD request fails (nothing cached), or it passes and torch.hub's download
    fails; either way an error naming the file and the way out, and no "Downloading" line."""
    import urllib.request

    from ssd_da.models import pretrained

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    model = build_resnet("resnet18", num_classes=None)
    for fails_at in ("head request", "download"):
        if fails_at == "download":
            monkeypatch.setattr(pretrained, "_check_reachable", lambda url: None)
            monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
        with pytest.raises(RuntimeError, match=r"could not fetch .*resnet18-f37072fd\.pth "
                                               r"\(.*no network.*local file"):
            load_pretrained(model, "ResNet18_Weights.IMAGENET1K_V1")
        printed = capsys.readouterr()
        assert "Downloading" not in printed.out + printed.err  # torch.hub says it on out or err
