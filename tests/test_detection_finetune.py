"""``vitzoo finetune-det`` end to end on a generated dataset: loss falls, mAP, checkpoints, exact resume, DDP."""
import contextlib
import io
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from vitzoo.cli import main
from vitzoo.detection.checkpoint import load_checkpoint
from vitzoo.detection.finetune import lr_factor
from vitzoo.detection.synthetic import make_shapes_dataset

COMMON = ['--backbone', 'shvit_s1', '--out-channels', '32', '--img-size', '96', '--workers', '0', '--no-progress',
          '--batch-size', '2', '--seed', '3']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('det'), num_train=4, num_val=2, size=(72, 96))


def _log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def _run(data, out, *extra):
    return main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON, *extra])


def test_lr_schedule():
    assert lr_factor(0, 10, [20, 30]) == pytest.approx(1e-3)
    assert lr_factor(5, 10, [20, 30]) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert [lr_factor(i, 10, [20, 30]) for i in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_finetune_loss_falls_and_reports_map(data, tmp_path):
    out = tmp_path / 'run'
    rc = _run(data, out, '--detector', 'fasterrcnn', '--epochs', '6', '--lr', '4e-4', '--warmup-iters', '2',
              '--hflip', '0', '--eval-every', '0', '--checkpoint-every', '0')
    assert rc == 0
    log = _log(out)
    losses = [r['loss'] for r in log if 'loss' in r]
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    evals = [r['eval'] for r in log if 'eval' in r]
    assert len(evals) == 1  # evaluated once, at the end
    # after 12 iterations AP is still ~0; the metric itself is checked against an oracle in test_detection_data
    assert 0.0 <= evals[0]['bbox']['AP'] <= 1.0 and 0.0 <= evals[0]['bbox']['AP50'] <= 1.0
    ckpt = load_checkpoint(out / 'checkpoint_last.pth')
    assert (ckpt['epoch'], ckpt['step'], ckpt['iteration']) == (6, 0, 12)
    assert (out / 'model_final.pth').is_file() and not list(out.glob('*.tmp'))
    # an existing run is not overwritten without --resume / --force
    assert _run(data, out, '--epochs', '1') == 1


def test_resume_continues_exactly(data, tmp_path):
    args = ['--detector', 'fasterrcnn', '--epochs', '3', '--lr', '2e-4', '--warmup-iters', '3', '--no-eval',
            '--checkpoint-every', '3']
    assert _run(data, tmp_path / 'full', *args, '--max-iters', '5') == 0
    assert _run(data, tmp_path / 'part', *args, '--max-iters', '3') == 0
    ckpt = load_checkpoint(tmp_path / 'part' / 'checkpoint_last.pth')
    assert (ckpt['epoch'], ckpt['step'], ckpt['iteration']) == (1, 1, 3)  # 2 iterations per epoch
    assert all(s['step'] == 3 for s in ckpt['optimizer']['state'].values())
    assert _run(data, tmp_path / 'part', *args, '--max-iters', '5', '--resume') == 0
    full, part = _log(tmp_path / 'full'), _log(tmp_path / 'part')
    assert [r['iteration'] for r in full] == [r['iteration'] for r in part] == [1, 2, 3, 4, 5]
    for a, b in zip(full, part):
        assert a['lr'] == pytest.approx(b['lr'])
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-4, abs=1e-5), (a, b)
    wa = torch.load(tmp_path / 'full' / 'model_final.pth')
    wb = torch.load(tmp_path / 'part' / 'model_final.pth')
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_after_an_evaluation_continues_exactly(data, tmp_path):
    """Found by an audit: the epoch-end evaluation (the default) runs after the checkpoint, and its DataLoader drew
    from the global torch RNG, which then went on differently in the uninterrupted run than in the resumed one (the
    R-CNN samplers draw from it): the iteration-3 loss differed."""
    args = ['--detector', 'fasterrcnn', '--epochs', '3', '--lr', '2e-4', '--warmup-iters', '3']
    assert _run(data, tmp_path / 'full', *args, '--max-iters', '4') == 0
    assert _run(data, tmp_path / 'part', *args, '--max-iters', '2') == 0  # epoch end: checkpoint, then evaluation
    assert _run(data, tmp_path / 'part', *args, '--max-iters', '4', '--resume') == 0
    full, part = ([r for r in _log(tmp_path / name) if 'loss' in r] for name in ('full', 'part'))
    assert [r['iteration'] for r in full] == [r['iteration'] for r in part] == [1, 2, 3, 4]
    assert [r['loss'] for r in full] == [r['loss'] for r in part]  # exact on one machine, as without evaluation
    # the same random draws in between: the torch RNG state each run saved at its end is the same
    ends = [load_checkpoint(tmp_path / name / 'checkpoint_last.pth') for name in ('full', 'part')]
    assert ends[0]['iteration'] == ends[1]['iteration'] == 4
    assert torch.equal(ends[0]['rng'][0]['torch'], ends[1]['rng'][0]['torch'])


def test_cli_reports_bad_data(tmp_path, capsys):
    assert main(['finetune-det', '--data', str(tmp_path), '--out', str(tmp_path / 'o')]) == 1
    assert 'instances_train.json not found' in capsys.readouterr().err


def test_cli_reports_a_backbone_it_cannot_build(data, tmp_path, capsys):
    base = ['finetune-det', '--data', str(data), '--device', 'cpu', '--workers', '0', '--no-progress']
    assert main(base + ['--out', str(tmp_path / 'a'), '--backbone', 'shvit_s9']) == 2
    assert "error: unknown model 'shvit_s9'; closest matches: shvit_s4" in capsys.readouterr().err
    assert main(base + ['--out', str(tmp_path / 'b'), '--backbone', 'nvit_b']) == 1
    err = capsys.readouterr().err
    assert "error: cannot build backbone 'nvit_b': nvit_b: the per-block dims" in err and 'Traceback' not in err
    # found by an audit: the advice was Python calls (timm.create_model(..., dims=...), KNOWN_DIMS)
    assert err.endswith('checkpoint): load its checkpoint with --pretrained or --backbone-weights FILE\n'), err
    text = tmp_path / 'text.pth'
    text.write_bytes(b'junk\n')
    assert main(base + ['--out', str(tmp_path / 'c'), '--backbone', 'shvit_s1', '--backbone-weights', str(text)]) == 1
    err = capsys.readouterr().err
    assert f"error: could not load {text} into backbone 'shvit_s1'" in err
    assert 'neither a safetensors file nor a torch.save archive' in err  # the file named for what it is
    assert main(base + ['--out', str(tmp_path / 'd'), '--backbone', 'resnet18', '--backbone-weights', str(text)]) == 1
    err = capsys.readouterr().err
    assert 'neither a safetensors file nor a torch.save archive' in err and 'weights_only=False' not in err
    # another model's checkpoint: one line with advice that applies to the command (before: 2-5 lines ending in
    # "To fix: ...; or use pretrained=False.", or torch's whole list of missing and unexpected keys)
    import timm
    from safetensors.torch import save_file
    for other in ('resnet18', 'shvit_s1'):
        save_file(timm.create_model(other).state_dict(), str(tmp_path / f'{other}.safetensors'))
    for backbone, weights in (('shvit_s1', 'resnet18.safetensors'), ('resnet18', 'shvit_s1.safetensors')):
        assert main(base + ['--out', str(tmp_path / 'e'), '--backbone', backbone, '--backbone-weights',
                            str(tmp_path / weights)]) == 1
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'pretrained' not in err and 'To fix' not in err, err
        assert err.startswith(f"vitzoo finetune-det: error: could not load {tmp_path / weights} into backbone "
                              f"'{backbone}': ") and len(err) < 800, err
        assert err.endswith(f'the file must hold {backbone} weights (with or without its classifier), or choose '
                            'the backbone it was saved from.\n'), err
    # a .pth that pickles other Python objects (before: a traceback ending in timm's "retry with weights_only=False")
    import datetime
    torch.save({'model': timm.create_model('shvit_s1').state_dict(), 'saved': datetime.date(2025, 1, 1)},
               tmp_path / 'objects.pth')
    assert main(base + ['--out', str(tmp_path / 'f'), '--backbone', 'shvit_s1', '--backbone-weights',
                        str(tmp_path / 'objects.pth')]) == 1
    err = capsys.readouterr().err
    assert err == (f"vitzoo finetune-det: error: could not load {tmp_path / 'objects.pth'} into backbone 'shvit_s1': "
                   'the file pickles Python objects other than tensors (datetime.date), which are not loaded because '
                   'unpickling them can run code; if you trust it, save its state dict (tensors only) to a new file '
                   'and give that.\n'), err
    assert not any((tmp_path / d).exists() for d in 'abcdef')  # nothing written for a run that could not start


def test_cli_advice_names_the_commands_options_not_python_arguments(data, tmp_path, capsys, monkeypatch):
    """Found by an audit: a load error ended with advice only Python can follow (pass pretrained_strict=False,
    pass pretrained_cfg_overlay=dict(file=...), use pretrained=False, use the entrypoint of the checkpoint's
    variant); the command's options are named instead, and a partial load is not offered."""
    import timm
    from huggingface_hub import constants

    base = ['finetune-det', '--data', str(data), '--device', 'cpu', '--workers', '0', '--no-progress', '--backbone',
            'shvit_s1']
    state = timm.create_model('shvit_s1').state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith('stages.2.blocks.0.')}, tmp_path / 'partial.pth')
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    for weights in ('partial.pth', 'resnet18.pth'):
        assert main(base + ['--out', str(tmp_path / 'a'), '--backbone-weights', str(tmp_path / weights)]) == 1
        err = capsys.readouterr().err
        assert err.endswith('the file must hold shvit_s1 weights (with or without its classifier), or choose the '
                            'backbone it was saved from.\n'), err
        assert 'pretrained_strict' not in err and 'entrypoint' not in err and '.;' not in err, err
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-hub-cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert main(base + ['--out', str(tmp_path / 'b'), '--pretrained']) == 1
    err = capsys.readouterr().err
    assert err.endswith('offline, give a local file with --backbone-weights FILE; or leave out --pretrained and '
                        '--backbone-weights (a randomly initialised backbone).\n'), err
    assert 'pretrained_cfg_overlay' not in err and 'pretrained=False' not in err, err
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_existing_run_is_never_replaced_unasked(data, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"iteration": 1}\n{"iteration": 2}\n')
    (out / 'model_final.pth').write_bytes(b'precious')
    assert _run(data, out, '--max-iters', '1', '--no-eval') == 1
    err = capsys.readouterr().err
    # no checkpoint: --resume is not offered (there is nothing it could resume from)
    assert 'holds files of an earlier run (log.jsonl, model_final.pth) but no checkpoint_last.pth to --resume ' \
           'from; pass --force to start afresh' in err, err
    assert (out / 'model_final.pth').read_bytes() == b'precious' and len(_log(out)) == 2
    assert not (out / 'checkpoint_last.pth').exists()
    # found by an audit: the same folder as RUN/missing/.. was seen as new and its run replaced
    assert _run(data, out / 'missing' / '..', '--max-iters', '1', '--no-eval') == 1
    assert 'holds files of an earlier run' in capsys.readouterr().err
    assert (out / 'model_final.pth').read_bytes() == b'precious' and len(_log(out)) == 2
    assert sorted(os.listdir(out)) == ['log.jsonl', 'model_final.pth']
    # --force starts afresh: the earlier run's files are removed, none of its log lines is kept
    assert _run(data, out, '--max-iters', '1', '--no-eval', '--force') == 0
    assert [r['iteration'] for r in _log(out)] == [1]
    assert (out / 'model_final.pth').read_bytes() != b'precious' and (out / 'checkpoint_last.pth').is_file()
    assert _run(data, out, '--max-iters', '1', '--no-eval') == 1
    assert 'already holds a run (checkpoint_last.pth, log.jsonl, model_final.pth); pass --resume to continue it ' \
           'or --force' in capsys.readouterr().err


def test_resume_errors_are_one_line(data, tmp_path, capsys):
    args = ['--detector', 'fasterrcnn', '--epochs', '1', '--no-eval', '--max-iters', '1']
    out = tmp_path / 'run'
    assert _run(data, out, *args) == 0
    capsys.readouterr()
    # another backbone than the run it resumes
    rc = main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON[2:], '--backbone', 'revit_t',
               *args, '--resume'])
    err = capsys.readouterr().err
    assert rc == 1 and 'is from another run: --backbone shvit_s1 there, revit_t here' in err, err
    # another batch size: a mid-epoch resume would skip the wrong images (found by an audit: not checked)
    assert _run(data, out, *args, '--resume', '--batch-size', '1') == 1
    assert 'is from another run: --batch-size 2 there, 1 here' in capsys.readouterr().err
    # a file that is not a training checkpoint: text, and a plain state dict
    text = tmp_path / 'text.pth'
    text.write_bytes(b'not a checkpoint\n')
    torch.save({'model': {'w': torch.zeros(1)}}, tmp_path / 'sd.pth')
    for path, message in ((text, 'is not a readable finetune-det checkpoint'),
                          (tmp_path / 'sd.pth', 'is not a finetune-det training checkpoint (missing')):
        assert _run(data, tmp_path / 'other', *args, '--resume', str(path)) == 1
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, err
    assert main(['finetune-det', '--data', str(data), '--out', str(tmp_path / 'x'), '--epochs', '0']) == 2
    assert '--epochs must be >= 1, got 0' in capsys.readouterr().err
    # a finished run: resuming it would train 0 iterations, which is an error (before: 'done: 1 iterations')
    final = (out / 'model_final.pth').read_bytes()
    assert _run(data, out, *args, '--resume') == 1
    captured = capsys.readouterr()
    assert 'is at epoch 0, iteration 1: nothing is left to train with --epochs 1 / --max-iters 1; raise --epochs ' \
           'or --max-iters' in captured.err, captured
    assert 'done:' not in captured.out, captured.out
    assert (out / 'model_final.pth').read_bytes() == final


def test_resume_of_another_run_never_replaces_a_run_unasked(data, tmp_path, capsys):
    """Found by an audit: --resume of one run's checkpoint with --out of another run overwrote that run's checkpoint,
    weights and log without --force; and --resume into a folder that did not exist died after one iteration."""
    args = ['--detector', 'retinanet', '--epochs', '2', '--no-eval']
    r1, r2 = tmp_path / 'r1', tmp_path / 'r2'
    assert _run(data, r1, *args, '--max-iters', '1') == 0
    assert _run(data, r2, *args, '--max-iters', '1', '--seed', '5') == 0
    before = {name: (r2 / name).read_bytes() for name in ('checkpoint_last.pth', 'log.jsonl', 'model_final.pth')}
    capsys.readouterr()
    assert _run(data, r2, *args, '--max-iters', '2', '--resume', str(r1 / 'checkpoint_last.pth')) == 1
    captured = capsys.readouterr()
    assert captured.err == (f'vitzoo finetune-det: error: {r2} already holds another run (checkpoint_last.pth, '
                            f'log.jsonl, model_final.pth); resuming {r1 / "checkpoint_last.pth"} into it would '
                            'replace those files: pass --force to replace them, or choose another --out.\n')
    assert 'resumed' not in captured.out
    assert {name: (r2 / name).read_bytes() for name in before} == before
    # --force: r2's files are replaced; its log holds only the resumed run's lines (iteration 2), none of r2's own
    assert _run(data, r2, *args, '--max-iters', '2', '--resume', str(r1 / 'checkpoint_last.pth'), '--force') == 0
    assert [r['iteration'] for r in _log(r2)] == [2]
    assert load_checkpoint(r2 / 'checkpoint_last.pth')['iteration'] == 2
    assert [r['iteration'] for r in _log(r1)] == [1] and load_checkpoint(r1 / 'checkpoint_last.pth')['iteration'] == 1
    # into a folder that does not exist yet: created (before: "No such file or directory: .../log.jsonl")
    new = tmp_path / 'new' / 'deeper'
    assert _run(data, new, *args, '--max-iters', '2', '--resume', str(r1 / 'checkpoint_last.pth')) == 0
    assert [r['iteration'] for r in _log(new)] == [2] and (new / 'model_final.pth').is_file()
    # the run continuing itself needs no --force
    assert _run(data, r1, *args, '--max-iters', '2', '--resume') == 0
    assert [r['iteration'] for r in _log(r1)] == [1, 2]


def test_resume_from_an_earlier_checkpoint_logs_each_iteration_once(data, tmp_path):
    """A run that stopped after its last checkpoint redoes the iterations since; their old log lines are dropped."""
    args = ['--detector', 'retinanet', '--epochs', '2', '--no-eval']
    out = tmp_path / 'run'
    assert _run(data, out, *args, '--max-iters', '1') == 0
    saved = (out / 'checkpoint_last.pth').read_bytes()
    assert _run(data, out, *args, '--max-iters', '3', '--resume') == 0
    assert [r['iteration'] for r in _log(out)] == [1, 2, 3]
    (out / 'checkpoint_last.pth').write_bytes(saved)  # as if the run had died before checkpointing iteration 3
    assert _run(data, out, *args, '--max-iters', '3', '--resume') == 0
    assert [r['iteration'] for r in _log(out)] == [1, 2, 3]


def test_log_records_the_lr_of_each_update(data, tmp_path):
    """Found by an audit: the logged lr was read after scheduler.step(), i.e. the next iteration's."""
    out = tmp_path / 'run'
    assert _run(data, out, '--detector', 'retinanet', '--no-eval', '--max-iters', '3', '--lr', '1e-3',
                '--warmup-iters', '2') == 0
    # linear warm-up from 0.001x over 2 iterations: updates 1, 2, 3 use 0.001x, (0.001 + 0.999 / 2)x, 1x
    assert [r['lr'] for r in _log(out)] == pytest.approx([1e-6, 5.005e-4, 1e-3])


def test_hflip_probability_and_logged_loss_is_the_sum(data, tmp_path, monkeypatch):
    """--hflip 1 flips every image, --hflip 0 none; the logged loss is the sum of torchvision's loss terms."""
    import vitzoo.detection.finetune as ft
    flipped, real = [], ft.hflip
    monkeypatch.setattr(ft, 'hflip', lambda image, target: (flipped.append(1), real(image, target))[1])
    for p, expected in (('1', 2), ('0', 0)):  # one iteration of batch 2
        flipped.clear()
        assert _run(data, tmp_path / p, '--detector', 'retinanet', '--no-eval', '--max-iters', '1', '--hflip', p) == 0
        assert len(flipped) == expected, p
    (record,) = _log(tmp_path / '1')
    parts = {k: v for k, v in record.items() if k not in ('iteration', 'epoch', 'lr', 'loss')}
    assert set(parts) == {'classification', 'bbox_regression'}
    assert record['loss'] == pytest.approx(sum(parts.values()), rel=1e-6)


def test_resume_with_more_epochs_follows_the_new_schedule_from_its_first_update(data, tmp_path):
    """--epochs 1 puts both lr steps at iteration 2 (0.01x); resumed with --epochs 2 they are at iterations 2 and 4,
    so update 3 uses 0.1x (before: the old schedule's 0.01x, restored with the optimizer)."""
    args = ['--detector', 'retinanet', '--no-eval', '--lr', '1e-3', '--warmup-iters', '0']
    out = tmp_path / 'run'
    assert _run(data, out, *args, '--epochs', '1') == 0
    assert _run(data, out, *args, '--epochs', '2', '--resume') == 0
    assert [r['lr'] for r in _log(out)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


def test_resume_with_other_frozen_stages_names_the_option(data, tmp_path, capsys):
    """Found by an audit: torch's "loaded state dict contains a parameter group that doesn't match the size of
    optimizer's group" was printed."""
    args = ['--detector', 'retinanet', '--epochs', '2', '--no-eval']
    out = tmp_path / 'run'
    assert _run(data, out, *args, '--max-iters', '1') == 0
    capsys.readouterr()
    assert _run(data, out, *args, '--max-iters', '2', '--resume', '--frozen-stages', '1') == 1
    err = capsys.readouterr().err
    assert err == (f'vitzoo finetune-det: error: {out / "checkpoint_last.pth"} is from another run: --frozen-stages '
                   '-1 there, 1 here. Resume with the same arguments, or start a new run (--out elsewhere, or '
                   '--force).\n'), err
    # the optimizer's state carries lr and weight decay: another --lr was silently replaced by the checkpoint's
    assert _run(data, out, *args, '--max-iters', '2', '--resume', '--lr', '0.5') == 1
    err = capsys.readouterr().err
    assert '--lr ' in err and ' there, 0.5 here' in err, err
    # another dataset's classes: the keys that do not fit are named (before: "Error(s) in loading state_dict for
    # RetinaNet: ...")
    more = tmp_path / 'four-classes'
    (more / 'annotations').mkdir(parents=True)
    (more / 'train').symlink_to(data / 'train')
    coco = json.loads((data / 'annotations' / 'instances_train.json').read_text())
    coco['categories'].append(dict(id=99, name='extra'))
    (more / 'annotations' / 'instances_train.json').write_text(json.dumps(coco))
    assert _run(more, out, *args, '--max-iters', '2', '--resume') == 1
    err = capsys.readouterr().err
    assert err == (f'vitzoo finetune-det: error: {out / "checkpoint_last.pth"} does not fit this model (another '
                   "dataset's classes?): 2 keys of another shape (e.g. head.classification_head.cls_logits.weight, "
                   'head.classification_head.cls_logits.bias).\n'), err
    # a checkpoint without its arguments: the optimizer state that does not fit is named for what it is
    ckpt = load_checkpoint(out / 'checkpoint_last.pth')
    del ckpt['args']
    torch.save(ckpt, tmp_path / 'bare.pth')
    assert _run(data, tmp_path / 'other', *args, '--max-iters', '2', '--resume', str(tmp_path / 'bare.pth'),
                '--frozen-stages', '1') == 1
    err = capsys.readouterr().err
    assert err == (f'vitzoo finetune-det: error: {tmp_path / "bare.pth"}: its optimizer state does not fit this '
                   "model's trainable parameters (a run with another --frozen-stages?); resume with the arguments "
                   'of the run that wrote it.\n'), err


@pytest.mark.parametrize('content,reason', [
    (b'not a checkpoint\n', 'not a torch.save file (another kind of file, or corrupt)'),
    (b'', 'the file is empty'),
    ('truncated', 'a torch.save archive that is corrupt (truncated or damaged)'),
])
def test_unreadable_resume_checkpoint_is_named_for_what_it_is(data, tmp_path, capsys, content, reason):
    """Found by an audit: only the last line of torch's error was shown ("Check the documentation of torch.load
    ..."), and an empty file gave "list index out of range"."""
    path = tmp_path / 'bad.pth'
    if content == 'truncated':
        torch.save({'model': {'w': torch.zeros(1000)}}, path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    assert _run(data, tmp_path / 'out', '--no-eval', '--resume', str(path)) == 1
    err = capsys.readouterr().err
    assert err == (f'vitzoo finetune-det: error: {path} is not a readable finetune-det checkpoint: {reason}; give '
                   'the checkpoint_last.pth of a finetune-det run.\n'), err


@pytest.mark.parametrize('option,value,message', [
    ('--device', 'foo', "--device 'foo' is not a device; use cpu, cuda or cuda:N."),
    ('--device', 'xla', '--device xla: only cpu, cuda[:N] and mps are supported.'),
    ('--out-channels', '0', '--out-channels must be >= 1, got 0.'),
    ('--img-size', '0', '--img-size must be >= 32, got 0.'),
    ('--img-size', '1', '--img-size must be >= 32, got 1.'),  # a traceback from torchvision's resize before
    ('--max-size', '1', '--max-size must be >= 32, got 1.'),
    ('--max-iters', '0', '--max-iters must be >= 1, got 0.'),
    ('--workers', '-1', '--workers must be >= 0, got -1.'),
    ('--warmup-iters', '-1', '--warmup-iters must be >= 0, got -1.'),
    ('--checkpoint-every', '-5', '--checkpoint-every must be >= 0, got -5.'),
    ('--eval-every', '-1', '--eval-every must be >= 0, got -1.'),
    ('--frozen-stages', '-2', '--frozen-stages must be >= -1, got -2.'),
    ('--lr', 'nan', '--lr must be a positive finite number, got nan.'),
    ('--lr', '0', '--lr must be a positive finite number, got 0.0.'),
    ('--weight-decay', '-0.1', '--weight-decay must be a non-negative finite number, got -0.1.'),
    ('--hflip', '1.5', '--hflip is a probability (0 to 1), got 1.5.'),
    ('--lr-steps', '0', '--lr-steps are epochs after which the lr drops (>= 1), got [0].'),
    # found by an audit: a step that never takes effect was accepted
    ('--lr-steps', '8 12 13', '--lr-steps must be below --epochs 12 (a step at or after the end of the last epoch '
                              'never drops the lr), got [12, 13]; lower them or raise --epochs.'),
    ('--epochs', '2 --lr-steps 1 2', '--lr-steps must be below --epochs 2 (a step at or after the end of the last '
                                     'epoch never drops the lr), got [2]; lower them or raise --epochs.'),
    ('--seed', '-1', '--seed must be in 0 .. 2**32-1, got -1.'),
    # found by an audit: one of two options that say the same thing was ignored
    ('--img-size', '64 --min-size 600', '--img-size sets both --min-size and --max-size; give --img-size alone, or '
                                        '--min-size / --max-size.'),
    ('--pretrained', '--backbone-weights x.pth', "--pretrained and --backbone-weights both give the backbone's "
                                                 "weights; give one of them."),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, option, value, message):
    # the dataset folder does not exist: the argument is reported first, and nothing is created
    rc = main(['finetune-det', '--data', str(tmp_path / 'no-data'), '--out', str(tmp_path / 'out'), option,
               *value.split()])
    err = capsys.readouterr().err
    assert rc == 2 and err == f'vitzoo finetune-det: error: {message}\n', err
    assert not (tmp_path / 'out').exists()


def test_zero_images_is_an_error(data, tmp_path, capsys):
    root = tmp_path / 'empty'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train').mkdir()
    coco = json.loads((data / 'annotations' / 'instances_train.json').read_text())
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(dict(coco, images=[], annotations=[])))
    assert _run(root, tmp_path / 'out', '--no-eval') == 1
    captured = capsys.readouterr()
    assert 'instances_train.json: "images" is empty' in captured.err and 'done:' not in captured.out
    assert not (tmp_path / 'out').exists()


def test_diverging_loss_is_one_line(data, tmp_path, capsys):
    out = tmp_path / 'run'
    rc = _run(data, out, '--lr', '1e30', '--warmup-iters', '0', '--epochs', '3', '--no-eval', '--hflip', '0')
    err = capsys.readouterr().err
    assert rc == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('vitzoo finetune-det: error: non-finite loss at iteration ')
    assert 'start again (--force, or another --out) with a lower --lr (now 1e+30) or a larger --warmup-iters (now ' \
           '0), or check the data.' in err
    assert not (out / 'model_final.pth').exists()


def test_out_of_memory_is_one_line_naming_the_options_to_lower(data, tmp_path, capsys, monkeypatch):
    """Found by an audit: running out of memory (a large --batch-size, --img-size or --out-channels) was a traceback.
    The allocation here is torch's own, of 1 EiB, beyond any machine's address space; any other error still raises."""
    import vitzoo.detection.finetune as finetune

    def too_large(*args, **kwargs):
        return torch.empty(1 << 60, dtype=torch.uint8)
    monkeypatch.setattr(finetune, 'build_detector', too_large)
    out = tmp_path / 'run'
    rc = _run(data, out, '--no-eval', '--batch-size', '3', '--img-size', '96', '--out-channels', '24')
    err = capsys.readouterr().err
    assert rc == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('vitzoo finetune-det: error: out of memory (RuntimeError: ') and "can't allocate" in err
    assert err.rstrip().endswith('lower --batch-size (now 3), --img-size / --max-size (now 96) or --out-channels '
                                 '(now 24).')
    assert not out.exists()

    def broken(*args, **kwargs):
        raise RuntimeError('a bug, not a lack of memory')
    monkeypatch.setattr(finetune, 'build_detector', broken)
    with pytest.raises(RuntimeError, match='a bug, not a lack of memory'):
        _run(data, tmp_path / 'run2', '--no-eval')


def test_infinite_loss_stops_like_nan(data, tmp_path, capsys, monkeypatch):
    """+inf is as fatal as NaN: it stops before the first update (torch.isfinite, not only isnan)."""
    from torchvision.models.detection.retinanet import RetinaNet

    def infinite(self, targets, head_outputs, anchors, *args):
        zero = head_outputs['cls_logits'].sum() * 0
        return {'classification': zero + float('inf'), 'bbox_regression': zero}
    monkeypatch.setattr(RetinaNet, 'compute_loss', infinite)
    out = tmp_path / 'run'
    rc = _run(data, out, '--detector', 'retinanet', '--no-eval', '--max-iters', '2', '--hflip', '0')
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith('vitzoo finetune-det: error: non-finite loss at iteration 1 '), err
    assert 'classification inf' in err and not (out / 'model_final.pth').exists()


def test_image_errors_in_workers_are_one_line_and_leave_no_run(data, tmp_path, capsys):
    bad = tmp_path / 'bad'
    (bad / 'annotations').mkdir(parents=True)
    (bad / 'annotations' / 'instances_train.json').write_bytes(
        (data / 'annotations' / 'instances_train.json').read_bytes())
    (bad / 'train').mkdir()
    for image in (data / 'train').iterdir():
        (bad / 'train' / image.name).write_bytes(b'not a png')  # every image: the first one loaded fails
    out = tmp_path / 'run'
    assert _run(bad, out, '--workers', '2', '--no-eval') == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'DataLoader worker' not in err and 'Traceback' not in err, err
    assert err.startswith('vitzoo finetune-det: error: ') and 'instances_train.json: image id ' in err
    assert 'cannot decode' in err and 'not a png' not in err
    # the failed run left no log.jsonl, so the folder is no run; an empty log (left by older versions) is none
    assert not (out / 'log.jsonl').exists()
    (out / 'log.jsonl').write_text('')
    assert _run(data, out, '--max-iters', '1', '--no-eval') == 0
    assert [r['iteration'] for r in _log(out)] == [1]


def test_force_help_says_what_it_replaces(capsys):
    with pytest.raises(SystemExit):
        main(['finetune-det', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'already holds a run (a checkpoint, a non-empty log or final weights): those files are removed' in text


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _join_ddp(rank, world, port, change_losses=None):
    """Be rank ``rank`` of a ``world``-process Gloo job on ``port``; ``change_losses(losses)``, when given, replaces
    the detector's training losses (None: keep them)."""
    import vitzoo.detection.finetune as finetune
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    if change_losses is None:
        return
    build = finetune.build_detector

    def build_changed(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda m, inputs, losses: change_losses(losses) if m.training else None)
        return model

    finetune.build_detector = build_changed


def _ddp_worker(rank, world, port, data, out):
    _join_ddp(rank, world, port)
    rc = main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON, '--detector', 'retinanet',
               '--epochs', '1', '--no-eval', '--device', 'cpu'])
    assert rc == 0


@pytest.mark.slow
def test_ddp_two_processes_gloo(data, tmp_path):
    out = tmp_path / 'ddp'
    mp.spawn(_ddp_worker, args=(2, _free_port(), data, out), nprocs=2, join=True)
    log = _log(out)
    assert [r['iteration'] for r in log] == [1]  # 4 images / (2 per process x 2 processes) = 1 iteration
    ckpt = load_checkpoint(out / 'checkpoint_last.pth')
    assert ckpt['iteration'] == 1 and len(ckpt['rng']) == 2  # each rank's RNG state is kept


def _ddp_constant_loss_worker(rank, world, port, data, out):
    """Every loss of rank r is r + 1 (gradients zero)."""
    _join_ddp(rank, world, port, lambda losses: {k: v * 0 + rank + 1 for k, v in losses.items()})
    assert main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON, '--detector', 'retinanet',
                 '--epochs', '1', '--no-eval', '--device', 'cpu']) == 0


@pytest.mark.slow
def test_ddp_log_holds_the_losses_averaged_over_the_ranks(data, tmp_path):
    """Found by an audit: under DDP log.jsonl held rank 0's losses only (1/N of each batch)."""
    out = tmp_path / 'ddp'
    mp.spawn(_ddp_constant_loss_worker, args=(2, _free_port(), data, out), nprocs=2, join=True)
    (record,) = _log(out)
    parts = {k: v for k, v in record.items() if k.startswith(('classification', 'bbox'))}
    assert parts and all(v == 1.5 for v in parts.values()), record  # (1 + 2) / 2
    assert record['loss'] == 1.5 * len(parts)


def _ddp_diverging_worker(rank, world, port, data, out):
    """Rank 1's detector returns a NaN loss; rank 0's stays finite."""
    _join_ddp(rank, world, port, lambda losses: {k: v * float('nan') for k, v in losses.items()} if rank == 1 else None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON, '--detector', 'retinanet',
                   '--epochs', '1', '--no-eval', '--device', 'cpu'])
    (out.parent / f'rank{rank}.txt').write_text(f'{rc}\n{err.getvalue()}')


@pytest.mark.slow
def test_ddp_non_finite_loss_on_one_rank_stops_every_rank(data, tmp_path):
    # before, rank 1 stopped alone and rank 0 waited for it in DDP's gradient all-reduce (gloo: 30 min)
    out = tmp_path / 'ddp'
    procs = mp.spawn(_ddp_diverging_worker, args=(2, _free_port(), data, out), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail('a rank still runs 120 s after rank 1 met a non-finite loss')
    for rank in (0, 1):
        rc, err = (tmp_path / f'rank{rank}.txt').read_text().split('\n', 1)
        assert rc == '1' and err.count('\n') == 1, err
        assert err.startswith('vitzoo finetune-det: error: non-finite loss at iteration 1 (rank 1: '), err
        assert 'rank 0:' not in err
    assert not (out / 'model_final.pth').exists()


@pytest.mark.parametrize('epochs,steps', [(12, [8, 11]), (24, [16, 22])])
def test_default_lr_steps_are_8_and_11_of_12_epochs(data, tmp_path, monkeypatch, epochs, steps):
    """--lr-steps default: epochs 8 and 11 scaled to --epochs, in iterations (4 images / batch 2: 2 per epoch)."""
    from vitzoo.detection import finetune
    seen = []

    def spy(iteration, warmup_iters, milestones, *a, **kw):
        seen.append(list(milestones))
        return lr_factor(iteration, warmup_iters, milestones, *a, **kw)

    monkeypatch.setattr(finetune, 'lr_factor', spy)
    assert _run(data, tmp_path / 'run', '--detector', 'retinanet', '--no-eval', '--epochs', str(epochs),
                '--max-iters', '1') == 0
    assert seen and all(m == [2 * e for e in steps] for m in seen), seen


@pytest.mark.parametrize('epochs,steps', [(12, [8, 11]), (24, [16, 22]), (36, [24, 33]), (18, [12, 16]), (6, [4, 5]),
                                          (3, [2]), (2, [1]), (1, [])])
def test_default_lr_steps_fall_inside_the_run(epochs, steps):
    """Epochs 8 and 11 of 12, scaled and rounded down, only inside the run (found by an audit: rounding put the
    second step at the last epoch of a 6-epoch run, [4, 6], where it never took effect)."""
    from vitzoo.detection.finetune import default_lr_steps
    assert default_lr_steps(epochs) == steps


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    """Found by an audit: --out naming a file failed only after the data and model were built, with a bare
    "[Errno 17] File exists"."""
    afile = tmp_path / 'afile'
    afile.write_text('keep')
    rc = main(['finetune-det', '--data', str(tmp_path / 'no-data'), '--out', str(afile)])
    assert rc == 1 and capsys.readouterr().err == (f'vitzoo finetune-det: error: --out {afile} is a file, not a '
                                                   'folder; choose another --out.\n')
    assert afile.read_text() == 'keep'


def _copy_dataset(data, root, edit_split=None, edit=None):
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / split).symlink_to(data / split)
        coco = json.loads((data / 'annotations' / f'instances_{split}.json').read_text())
        if split == edit_split:
            edit(coco)
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))
    return root


def test_val_with_other_categories_is_refused_before_training(data, tmp_path, capsys):
    """Found by an audit: val's categories were never compared with train's (AP 0 without a word, or an error
    after the whole epoch)."""
    root = _copy_dataset(data, tmp_path / 'ds', 'val', lambda c: c['categories'].append({'id': 99, 'name': 'x'}))
    assert _run(root, tmp_path / 'run', '--detector', 'retinanet', '--epochs', '1') == 1
    captured = capsys.readouterr()
    assert 'instances_val.json lists other categories than' in captured.err and 'ids only in instances_val.json: ' \
        '[99]' in captured.err, captured.err
    assert not (tmp_path / 'run' / 'log.jsonl').exists() and 'done:' not in captured.out


def _zero_height_box(coco):
    coco['annotations'][0]['bbox'][3] = 0.0


def _malformed_polygons(coco):
    for ann in coco['annotations']:  # an exporter's bug hits every polygon
        ann['segmentation'].append([1.0, 2.0])


@pytest.mark.parametrize('edit, note', [
    (_zero_height_box, '1 annotation(s) with a box too small to train on (e.g. annotation id '),
    # found by the review of an audit's fix: one Python warning per annotation, on every rank
    (_malformed_polygons, ' malformed segmentation(s) left out, the detector training on boxes only'),
])
def test_what_a_box_only_run_leaves_out_is_one_note(data, tmp_path, capsys, edit, note):
    """A zero-height box (as in COCO 2017's train split), or malformed polygons a RetinaNet never reads, are left out
    of training with one note on stdout, not a refusal and not a Python warning."""
    root = _copy_dataset(data, tmp_path / 'ds', 'train', edit)
    assert _run(root, tmp_path / 'run', '--detector', 'retinanet', '--epochs', '1', '--max-iters', '1',
                '--no-eval') == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.out.splitlines() if line.startswith('note: ')]
    assert len(notes) == 1 and note in notes[0], notes
    assert 'Warning' not in captured.err, captured.err


def test_checkpoint_every_saves_at_its_multiples(data, tmp_path, monkeypatch):
    """--checkpoint-every 2 with 4 iterations per epoch (batch 1) and --max-iters 3: saved after iteration 2, then
    at the run's end (3: before the final weights, and again once they are written)."""
    from vitzoo.detection import finetune
    saved = []
    original = finetune._save

    def spy(path, model, optimizer, scheduler, state, *rest, **kw):
        saved.append(state['iteration'])
        return original(path, model, optimizer, scheduler, state, *rest, **kw)

    monkeypatch.setattr(finetune, '_save', spy)
    out = tmp_path / 'run'
    assert _run(data, out, '--detector', 'retinanet', '--no-eval', '--epochs', '1', '--batch-size', '1',
                '--max-iters', '3', '--checkpoint-every', '2') == 0
    assert saved == [2, 3, 3]
    assert load_checkpoint(out / 'checkpoint_last.pth')['iteration'] == 3


def test_pretrained_load_error_keeps_its_advice(data, tmp_path, capsys, monkeypatch):
    """Found by an audit: the backbone's pretrained-loading error lost its second line ("To fix: ...")."""
    def offline(name, pretrained, kwargs):
        assert pretrained
        raise RuntimeError(f'Could not load pretrained weights for {name} from Hugging Face Hub repo '
                           f'timm/{name}.in1k: LocalEntryNotFoundError: not in the cache.\n'
                           f'To fix: fetch them with `hf download timm/{name}.in1k`; or use pretrained=False.')

    monkeypatch.setattr('vitzoo.detection.backbone._create', offline)
    out = tmp_path / 'run'
    assert _run(data, out, '--pretrained') == 1
    assert capsys.readouterr().err == (
        "vitzoo finetune-det: error: could not load the default pretrained weights into backbone 'shvit_s1': Could "
        "not load pretrained weights for shvit_s1 from Hugging Face Hub repo timm/shvit_s1.in1k: "
        "LocalEntryNotFoundError: not in the cache. To fix: fetch them with `hf download timm/shvit_s1.in1k`; or leave "
        "out --pretrained and --backbone-weights (a randomly initialised backbone).\n")
    assert not out.exists()


# --- options that shape the model and the optimizer, checked on the objects the run built (found by an audit:
# --- hard-coding weight_decay=0.05 / norm_eval=True, or dropping --min-size / --max-size, left every test passing)

NO_SIZE = COMMON[:COMMON.index('--img-size')] + COMMON[COMMON.index('--img-size') + 2:]  # COMMON less --img-size


def _spy_on_the_run(monkeypatch):
    """Keep the detector that finetune-det builds, a copy of its first state, the mode of every backbone BatchNorm
    in each training forward, and the resized image sizes that its transform hands to the backbone."""
    from vitzoo.detection import finetune
    seen = dict(bn_training=[], image_sizes=[])
    build = finetune.build_detector

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        seen['model'] = model
        seen['initial'] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bns = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns  # shvit_s1 has BatchNorms throughout
        model.register_forward_pre_hook(
            lambda m, inputs: seen['bn_training'].append([b.training for b in bns]) if m.training else None)
        model.transform.register_forward_hook(
            lambda m, inputs, result: seen['image_sizes'].extend(tuple(s) for s in result[0].image_sizes))
        return model

    monkeypatch.setattr(finetune, 'build_detector', spy)
    return seen


def _run_sized(data, out, *extra):
    """A run without COMMON's --img-size (which replaces --min-size and --max-size)."""
    return main(['finetune-det', '--data', str(data), '--out', str(out), *NO_SIZE, *extra])


def test_option_defaults_follow_the_docs(tmp_path, monkeypatch):
    """The parsed defaults: weight decay 0.05, BatchNorms in eval mode, 800 / 1333; --img-size sets both sizes."""
    from vitzoo.detection import finetune
    got = []
    monkeypatch.setattr(finetune, 'train', lambda args, ctx: got.append(vars(args).copy()))
    base = ['finetune-det', '--data', str(tmp_path), '--out', str(tmp_path / 'o'), '--device', 'cpu']
    assert main(base) == 0
    assert main(base + ['--weight-decay', '0', '--no-norm-eval', '--min-size', '40', '--max-size', '50']) == 0
    assert main(base + ['--img-size', '64']) == 0
    assert main(base + ['--min-size', '40', '--img-size', '64']) == 2  # one of the two would be ignored
    picked = [(g['weight_decay'], g['norm_eval'], g['min_size'], g['max_size']) for g in got]
    assert picked == [(0.05, True, 800, 1333), (0.0, False, 40, 50), (0.05, True, 64, 64)]


def test_weight_decay_reaches_every_trainable_parameter(data, tmp_path, monkeypatch):
    """--weight-decay is the optimizer's; per the docs it applies to all trainable parameters (norm weights and
    biases included: one value for every group)."""
    seen = _spy_on_the_run(monkeypatch)
    out = tmp_path / 'run'
    assert _run(data, out, '--detector', 'retinanet', '--no-eval', '--max-iters', '1', '--weight-decay', '0.0123',
                '--frozen-stages', '0') == 0
    groups = load_checkpoint(out / 'checkpoint_last.pth')['optimizer']['param_groups']
    assert groups and all(g['weight_decay'] == pytest.approx(0.0123) for g in groups), groups
    trainable = [n for n, p in seen['model'].named_parameters() if p.requires_grad]
    frozen = [n for n, p in seen['model'].named_parameters() if not p.requires_grad]
    assert frozen and sum(len(g['params']) for g in groups) == len(trainable)  # the frozen stem is left out
    assert any(n.endswith('.bias') for n in trainable) and any('.bn.' in n for n in trainable)


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval_keeps_backbone_batchnorms_in_eval_mode(data, tmp_path, monkeypatch, norm_eval):
    """Default: every backbone BatchNorm runs in eval mode while training (running statistics stay as they were,
    the affine parameters still learn); --no-norm-eval: they run in train mode and update their statistics."""
    seen = _spy_on_the_run(monkeypatch)
    out = tmp_path / 'run'
    extra = [] if norm_eval else ['--no-norm-eval']
    assert _run(data, out, '--detector', 'retinanet', '--no-eval', '--max-iters', '1', '--lr', '1e-3',
                '--warmup-iters', '0', *extra) == 0
    assert len(seen['bn_training']) == 1  # one training forward
    assert set(seen['bn_training'][0]) == {not norm_eval}
    final = torch.load(out / 'model_final.pth')
    initial = seen['initial']
    stats = [k for k in final if k.startswith('backbone.body.') and k.endswith('running_mean')]
    assert stats
    for k in stats:
        prefix = k[:-len('running_mean')]
        kept = torch.equal(final[k], initial[k]) and torch.equal(final[prefix + 'running_var'],
                                                                 initial[prefix + 'running_var'])
        assert kept == norm_eval, k
        assert int(final[prefix + 'num_batches_tracked']) == (0 if norm_eval else 1), k
    # the affine parameters are trained either way (SHViT zero-inits the last BatchNorm of each residual branch, so
    # at the first update only some of them get a gradient; each that does moves)
    params = dict(seen['model'].named_parameters())
    affine = [k[:-len('running_mean')] + w for k in stats for w in ('weight', 'bias')]
    assert all(params[k].requires_grad for k in affine)
    moved = [k for k in affine if params[k].grad is not None and params[k].grad.abs().max() > 0]
    assert moved and all(not torch.equal(final[k], initial[k]) for k in moved)


def test_min_and_max_size_reach_the_detector_transform(data, tmp_path, monkeypatch):
    """--min-size / --max-size (without --img-size) are the resize of torchvision's transform: the 72x96 training
    images are scaled by min(min_size / 72, max_size / 96)."""
    seen = _spy_on_the_run(monkeypatch)
    for (min_size, max_size), expected in (((54, 200), (54, 72)), ((96, 120), (90, 120))):
        seen['image_sizes'].clear()
        assert _run_sized(data, tmp_path / f'{min_size}', '--detector', 'retinanet', '--no-eval', '--max-iters', '1',
                          '--min-size', str(min_size), '--max-size', str(max_size)) == 0
        transform = seen['model'].transform
        assert (tuple(transform.min_size), transform.max_size) == ((min_size,), max_size)
        assert seen['image_sizes'] == [expected, expected], (min_size, max_size)


def test_a_missing_val_annotation_file_is_a_note_or_an_error(data, tmp_path, capsys):
    """Found by an audit: without DIR/annotations/instances_val.json evaluation was silently off, also in a COCO
    folder renamed half-way (val/ there, or instances_val2017.json under its COCO name)."""
    root = tmp_path / 'ds'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train').symlink_to(data / 'train')
    (root / 'annotations' / 'instances_train.json').write_bytes(
        (data / 'annotations' / 'instances_train.json').read_bytes())
    expected = root / 'annotations' / 'instances_val.json'
    args = ['--detector', 'retinanet', '--max-iters', '1']
    assert _run(root, tmp_path / 'run', *args) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.out.splitlines() if line.startswith('note: ')]
    assert notes == [f'note: no {expected}, so no evaluation (pass --no-eval to train without one and without this '
                     'note).'], captured.out
    assert '[eval]' not in captured.out
    assert _run(root, tmp_path / 'quiet', *args, '--no-eval') == 0
    assert 'note: ' not in capsys.readouterr().out
    # half renamed: an error before any work, unless --no-eval
    (root / 'val').symlink_to(data / 'val')
    assert _run(root, tmp_path / 'half', *args) == 1
    assert capsys.readouterr().err == (
        f'vitzoo finetune-det: error: {root / "val"} is there but not {expected}: evaluation on val needs both; add '
        'the annotation file, or pass --no-eval to train without evaluation.\n')
    coco = root / 'annotations' / 'instances_val2017.json'
    coco.write_bytes((data / 'annotations' / 'instances_val.json').read_bytes())
    assert _run(root, tmp_path / 'half', *args) == 1
    assert capsys.readouterr().err == (
        f'vitzoo finetune-det: error: {coco} is there but not {expected}: evaluation on val needs both; rename it to '
        'instances_val.json (COCO 2017: also val2017/ to val/), or pass --no-eval to train without evaluation.\n')
    assert not (tmp_path / 'half').exists()
    assert _run(root, tmp_path / 'half', *args, '--no-eval') == 0


def test_resume_with_another_seed_or_norm_eval_is_refused(data, tmp_path, capsys):
    """Found by an audit: another --seed was accepted, which reorders the epoch a mid-epoch resume continues (some
    images trained twice, others skipped); --no-norm-eval changes how the backbone trains."""
    args = ['--detector', 'retinanet', '--epochs', '2', '--no-eval']
    out = tmp_path / 'run'
    assert _run(data, out, *args, '--max-iters', '1') == 0  # mid-epoch: 2 iterations per epoch
    capsys.readouterr()
    for extra, differ in ((['--seed', '4'], '--seed 3 there, 4 here'),
                          (['--no-norm-eval'], '--no-norm-eval not given there, given here')):
        assert _run(data, out, *args, '--max-iters', '2', '--resume', *extra) == 1
        assert capsys.readouterr().err == (
            f'vitzoo finetune-det: error: {out / "checkpoint_last.pth"} is from another run: {differ}. Resume with '
            'the same arguments, or start a new run (--out elsewhere, or --force).\n')
    assert [r['iteration'] for r in _log(out)] == [1]


def test_resume_of_a_folder_or_of_final_weights(data, tmp_path, capsys):
    """Found by an audit: --resume DIR said "checkpoint DIR not found" although DIR exists, and --resume of a run's
    model_final.pth listed the keys a checkpoint has and it lacks."""
    args = ['--detector', 'retinanet', '--epochs', '2', '--no-eval']
    run = tmp_path / 'run'
    assert _run(data, run, *args, '--max-iters', '1') == 0
    capsys.readouterr()
    # a run's folder: its checkpoint_last.pth
    assert _run(data, tmp_path / 'on', *args, '--max-iters', '2', '--resume', str(run)) == 0
    assert f'resumed from {run / "checkpoint_last.pth"}: epoch 0 step 1 iteration 1' in capsys.readouterr().out
    assert [r['iteration'] for r in _log(tmp_path / 'on')] == [2]
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert _run(data, tmp_path / 'other', *args, '--resume', str(empty)) == 1
    assert capsys.readouterr().err == (
        f'vitzoo finetune-det: error: --resume {empty} is a folder without a checkpoint_last.pth; give the '
        'checkpoint_last.pth of a finetune-det run, or the --out folder that holds it.\n')
    # final weights: named for what they are, and the run's checkpoint offered
    assert _run(data, tmp_path / 'other', *args, '--resume', str(run / 'model_final.pth')) == 1
    assert capsys.readouterr().err == (
        f'vitzoo finetune-det: error: {run / "model_final.pth"} holds model weights only (a state dict, like '
        'model_final.pth), not a checkpoint to resume from (optimizer, schedule, position in the data): resume from '
        f'{run / "checkpoint_last.pth"}.\n')
    assert not (tmp_path / 'other').exists()


def test_a_reader_that_goes_away_ends_the_run_quietly(data, tmp_path):
    """Found by a review: finetune-det's own error handling caught the BrokenPipeError of its prints (`| head`) and
    reported "error: [Errno 32] Broken pipe" with 1, where docs/cli.md says 141 and nothing printed."""
    import subprocess
    import sys
    cmd = [sys.executable, '-m', 'vitzoo', 'finetune-det', '--data', str(data), '--out', str(tmp_path / 'run'),
           *COMMON, '--max-iters', '1', '--no-eval']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 141 and 'error' not in err, err
