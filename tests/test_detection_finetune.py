"""``vitzoo finetune-det`` end to end on a generated dataset: loss falls, mAP, checkpoints, exact resume, DDP."""
import json
import os
import socket

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
    assert _run(data, out, '--epochs', '1') == 2


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


def test_cli_reports_bad_data(tmp_path, capsys):
    assert main(['finetune-det', '--data', str(tmp_path), '--out', str(tmp_path / 'o')]) == 2
    assert 'instances_train.json not found' in capsys.readouterr().err


def test_cli_reports_a_backbone_it_cannot_build(data, tmp_path, capsys):
    base = ['finetune-det', '--data', str(data), '--device', 'cpu', '--workers', '0', '--no-progress']
    assert main(base + ['--out', str(tmp_path / 'a'), '--backbone', 'shvit_s9']) == 2
    assert "error: unknown model 'shvit_s9'; closest matches: shvit_s4" in capsys.readouterr().err
    assert main(base + ['--out', str(tmp_path / 'b'), '--backbone', 'nvit_b']) == 2
    err = capsys.readouterr().err
    assert "error: cannot build backbone 'nvit_b': nvit_b: the per-block dims" in err and 'Traceback' not in err
    text = tmp_path / 'text.pth'
    text.write_bytes(b'junk\n')
    assert main(base + ['--out', str(tmp_path / 'c'), '--backbone', 'shvit_s1', '--backbone-weights', str(text)]) == 2
    err = capsys.readouterr().err
    assert f"error: could not load {text} into backbone 'shvit_s1'" in err
    assert 'neither a safetensors file nor a torch.save archive' in err  # the file named for what it is
    assert main(base + ['--out', str(tmp_path / 'd'), '--backbone', 'resnet18', '--backbone-weights', str(text)]) == 2
    err = capsys.readouterr().err
    assert 'neither a safetensors file nor a torch.save archive' in err and 'weights_only=False' not in err
    assert not any((tmp_path / d).exists() for d in 'abcd')  # nothing written for a run that could not start


def test_existing_run_is_never_replaced_unasked(data, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"iteration": 1}\n{"iteration": 2}\n')
    (out / 'model_final.pth').write_bytes(b'precious')
    assert _run(data, out, '--max-iters', '1', '--no-eval') == 2
    assert 'already holds a run (log.jsonl, model_final.pth); pass --resume' in capsys.readouterr().err
    assert (out / 'model_final.pth').read_bytes() == b'precious' and len(_log(out)) == 2
    assert not (out / 'checkpoint_last.pth').exists()


def test_resume_errors_are_one_line(data, tmp_path, capsys):
    args = ['--detector', 'fasterrcnn', '--epochs', '1', '--no-eval', '--max-iters', '1']
    out = tmp_path / 'run'
    assert _run(data, out, *args) == 0
    capsys.readouterr()
    # another backbone than the run it resumes
    rc = main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON[2:], '--backbone', 'revit_t',
               *args, '--resume'])
    err = capsys.readouterr().err
    assert rc == 2 and 'is from another run: --backbone shvit_s1 there, revit_t here' in err, err
    # a file that is not a training checkpoint: text, and a plain state dict
    text = tmp_path / 'text.pth'
    text.write_bytes(b'not a checkpoint\n')
    torch.save({'w': torch.zeros(1)}, tmp_path / 'sd.pth')
    for path, message in ((text, 'is not a readable finetune-det checkpoint'),
                          (tmp_path / 'sd.pth', 'is not a finetune-det training checkpoint (missing')):
        assert _run(data, tmp_path / 'other', *args, '--resume', str(path)) == 2
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, err
    assert main(['finetune-det', '--data', str(data), '--out', str(tmp_path / 'x'), '--epochs', '0']) == 2
    assert '--epochs must be >= 1, got 0' in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
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
