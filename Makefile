# Quick start: `make demo` then `make test`. Both create .venv with the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-bm4d lint format label-server demo test bench study study-mr study-autoencoder study-autoencoder-ceilings study-two-stage study-two-stage-controlnets study-two-stage-results release-data release-regression release-restoration release-restoration-ct release-restoration-mr release-restoration-mr-kspace release-restoration-ct-blur release-results stress-ddp device-kit clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-label.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-label.txt
	touch $(STAMP)

# BM4D, an optional classical baseline (requirements-baselines.txt; non-commercial licence): adds its rows to the
# baseline and results tables.
install-bm4d: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-baselines.txt

# The MONAI model zoo's lint settings (.ci/lint: copies of the zoo's setup.cfg and pyproject.toml) on scripts/ and
# tests/; `make format` applies isort and black.
LINT := .venv-lint
LINT_STAMP := $(LINT)/.installed
LINT_PATHS := scripts tests
$(LINT_STAMP): requirements-lint.txt
	$(PYTHON) -m venv $(LINT)
	$(LINT)/bin/pip install --quiet -r requirements-lint.txt
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(LINT)/bin/flake8 --config .ci/lint/setup.cfg $(LINT_PATHS)
	$(LINT)/bin/isort --settings-path .ci/lint/setup.cfg --check-only $(LINT_PATHS)
	$(LINT)/bin/black --config .ci/lint/pyproject.toml --skip-magic-trailing-comma --check $(LINT_PATHS)

format: $(LINT_STAMP)
	$(LINT)/bin/isort --settings-path .ci/lint/setup.cfg $(LINT_PATHS)
	$(LINT)/bin/black --config .ci/lint/pyproject.toml --skip-magic-trailing-comma $(LINT_PATHS)

# The MONAI Label server's separate environment (its dependencies conflict with the pinned stack above; see
# requirements-label-server.txt). Serve with: .venv-label/bin/monailabel start_server --app scripts/label_app ...
LABEL_ENV := .venv-label
LABEL_STAMP := $(LABEL_ENV)/.installed
label-server: $(LABEL_STAMP)

$(LABEL_STAMP): requirements-label-server.txt
	$(PYTHON) -m venv $(LABEL_ENV)
	$(LABEL_ENV)/bin/pip install --quiet --upgrade pip
	$(LABEL_ENV)/bin/pip install --quiet --no-deps -r requirements-label-server.txt
	touch $(LABEL_STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file configs/demo.json

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m scripts.bench sizes
	$(PY) -m scripts.bench engine
	$(PY) -m scripts.bench all
	$(PY) -m scripts.bench main
	$(PY) -m scripts.bench enhance
	$(PY) -m scripts.bench posterior
	$(PY) -m scripts.bench demo

# CPU study (about 1.5 h on 2 cores): small networks trained on a training region, then the results table on the
# held-out region. It measures the design choices (data consistency, posterior sampling); it is not the shipped
# model. Needs ../shared/data. Logs and outputs in $(S)/. `make study`: lung1 CT (5 -> 10 mm SR, 3 mm blur);
# `make study-mr`: the MNI T1 template (1 -> 4 mm and 1 -> 8 mm SR, 8 beyond the ControlNet's factors 1-6; Rician
# denoising), with every MR degradation in training (they are cheap; CT's low-dose projections are not).
S := outputs/study
RUN := $(PY) -m monai.bundle run
STUDY_VOLUMES := {'lung1_image.nrrd': 'ct'}
VAL_FRACTION := 0.25
PAIRS := 'configs/small.json','configs/fast_pairs.json'
STUDY_TASKS := ['ct_sr_5to10mm','ct_blur_gaussian_3mm']
STUDY_CROP := [256,256,-1]
STUDY_ROI := [256,256,32]
study: $(STAMP)
	mkdir -p $(S)/logs
	$(PY) -m scripts.datalist regions ../shared/data $(S)/regions --volumes "$(STUDY_VOLUMES)" \
	    --val_fraction $(VAL_FRACTION)
	$(RUN) training --config_file "['configs/train_autoencoder.json',$(PAIRS)]" --datalist $(S)/regions/datalist.json \
	    --ckpt_dir $(S)/models --output_dir $(S)/autoencoder --max_epochs 16 --epoch_length 50 --val_interval 4 \
	    --lr 0.0005 > $(S)/logs/autoencoder.log 2>&1
	$(RUN) --config_file "['configs/prepare_latents.json',$(PAIRS)]" --datalist $(S)/regions/datalist.json \
	    --ckpt_dir $(S)/models --output_dir $(S)/latents > $(S)/logs/latents.log 2>&1
	$(RUN) training --config_file "['configs/train_diffusion.json',$(PAIRS)]" --datalist $(S)/latents/datalist_latents.json \
	    --ckpt_dir $(S)/models --output_dir $(S)/diffusion --max_epochs 60 --epoch_length 50 --val_interval 5 \
	    --lr 0.0005 --ema_decay 0.99 > $(S)/logs/diffusion.log 2>&1
	$(RUN) training --config_file "['configs/train_controlnet.json',$(PAIRS)]" --datalist $(S)/regions/datalist.json \
	    --ckpt_dir $(S)/models --output_dir $(S)/controlnet --max_epochs 8 --epoch_length 50 --val_interval 2 \
	    --lr 0.0005 > $(S)/logs/controlnet.log 2>&1
	$(RUN) training --config_file "['configs/train_regression.json',$(PAIRS)]" --datalist $(S)/regions/datalist.json \
	    --ckpt_dir $(S)/models --output_dir $(S)/regression --max_epochs 8 --epoch_length 50 --val_interval 2 \
	    --lr 0.001 > $(S)/logs/regression.log 2>&1
	$(RUN) --config_file configs/results.json --datalist $(S)/regions/datalist.json --ckpt_dir $(S)/models \
	    --network_configs "['configs/small.json']" --output_dir $(S)/results --crop "$(STUDY_CROP)" \
	    --sliding_window "{'roi_size': $(STUDY_ROI), 'overlap': 0.25, 'sampling_overlap': 0.5}" \
	    --tasks "$(STUDY_TASKS)" --posterior_steps 25 > $(S)/logs/results.log 2>&1
	$(PY) -m scripts.figures curves $(S)/curves.png --runs "{'autoencoder': '$(S)/autoencoder', \
	    'prior': '$(S)/diffusion', 'controlnet': '$(S)/controlnet', 'regression': '$(S)/regression'}"

study-mr:
	$(MAKE) study S=outputs/study_mr STUDY_VOLUMES="{'mni152_t1_1mm.nii.gz': 'mr'}" VAL_FRACTION=0.3 \
	    PAIRS="'configs/small.json'" STUDY_TASKS="['mr_sr_1to4mm','mr_sr_1to8mm','mr_rician5']" \
	    STUDY_CROP="[160,176,40]" STUDY_ROI="[160,176,48]"

# The release data (../shared/data split by volume, scripts.datalist release) and its low-dose CT noise cache
# (3 dose levels, one realization each: about 11 minutes on 2 cores).
R := outputs/release
release-data: $(STAMP)
	mkdir -p $(R)/logs
	$(PY) -m scripts.datalist release ../shared/data $(R)/datalist.json
	$(PY) -m scripts.lowdose_cache $(R)/datalist.json $(R)/lowdose --doses "[0.1,0.25,0.5]" --realizations 1 \
	    > $(R)/logs/lowdose_cache.log 2>&1

# The release regression stage (models/model.pt): the 2.5D plane network (scripts.regression), the through-plane
# super-resolution specialist (thick-slice pairs only, MSE), bfloat16 on the CPU; each iteration 16 planes per axis
# from 2 crops of each of 2 volumes, 150 iterations per epoch, cosine schedule over 7 epochs, validation (whole 3D
# crops) every epoch, stopped by --patience or REG_SECONDS (resumable: run again to go on; the best model by
# validation L1 is $(R)/models/model.pt).
REG_SECONDS := 3000
# on a fresh machine (no earlier checkpoint under $(R)/models): REG_INIT=models/model.pt starts from the shipped weights
REG_INIT :=
release-regression: $(STAMP)
	mkdir -p $(R)/logs
	$(RUN) training --config_file configs/train_regression.json --datalist $(R)/lowdose/datalist.json \
	    --ckpt_dir $(R)/models --output_dir $(R)/regression --batch_size 2 --max_epochs 7 --epoch_length 150 \
	    --val_interval 1 --lr 0.0005 --max_seconds $(REG_SECONDS) --patience 5 \
	    $(if $(REG_INIT),--init_weights $(REG_INIT),--resume auto) >> $(R)/logs/regression.log 2>&1

# The release restoration stages (models/restoration_ct.pt, models/restoration_mr.pt): the same plane network and
# recipe on the same-grid task, one network per modality, denoising so far (configs/train_restoration.json: CT low
# dose from the cache; + configs/train_restoration_mr.json: MR Rician noise). One blind network for both modalities
# learnt MR's Rician bias and subtracted it from CT too; one for CT noise and blur together stayed at its identity
# start (the two residuals have opposite signs): both were worse than their input on validation.
# The main job runs them when the grid does not change. The MR denoiser's two CNNs are U-Nets (restoration_mr_def
# in configs/inference.json, since 0.19.0): 0.1-0.2 dB over the plain stack; both stay under BM4D.
# A continuation from shipped weights: a lower RES_LR and RES_EPOCHS that fit RES_SECONDS, so that the cosine
# schedule ends within the run.
RES_SECONDS := 2400
RES_LR := 0.0005
RES_EPOCHS := 6
RES_INIT_CT :=
RES_INIT_MR :=
RES_ARGS = --datalist $(R)/lowdose/datalist.json --ckpt_dir $(R)/models --batch_size 2 --max_epochs $(RES_EPOCHS) \
	--epoch_length 150 --val_interval 1 --lr $(RES_LR) --max_seconds $(RES_SECONDS) --patience 4
release-restoration: release-restoration-mr release-restoration-ct
# $(call restoration,NAME,OVERRIDE,INIT): train NAME (restoration_ct, ...) with train_restoration.json plus the
# OVERRIDE config (none for CT low dose), from INIT weights when given, else resuming; log in $(R)/logs/NAME.log.
restoration = mkdir -p $(R)/logs && $(RUN) training --config_file "['configs/train_regression.json', \
	'configs/train_restoration.json'$(if $(2),$(comma)'configs/$(2)')]" $(RES_ARGS) --output_dir $(R)/$(1) \
	$(if $(3),--init_weights $(3),--resume auto) >> $(R)/logs/$(1).log 2>&1
comma := ,
release-restoration-ct: $(STAMP)
	$(call restoration,restoration_ct,,$(RES_INIT_CT))
release-restoration-mr: $(STAMP)
	$(call restoration,restoration_mr,train_restoration_mr.json,$(RES_INIT_MR))
# MR k-space truncation (models/restoration_mr_kspace.pt, the main job's --degradation kspace): the same network on
# in-plane k-space truncation pairs (factors 1-3), from its near-identity start.
RES_INIT_MR_KSPACE :=
release-restoration-mr-kspace: $(STAMP)
	$(call restoration,restoration_mr_kspace,train_restoration_mr_kspace.json,$(RES_INIT_MR_KSPACE))
# CT deblurring (models/restoration_ct_blur.pt, the main job's --degradation blur): the same network refines the
# known-kernel least squares of Gaussian and box blurs of 0.5-2 mm, from its near-identity start.
RES_INIT_CT_BLUR :=
release-restoration-ct-blur: $(STAMP)
	$(call restoration,restoration_ct_blur,train_restoration_ct_blur.json,$(RES_INIT_CT_BLUR))

# The results table of the release on the validation volumes (classical baselines and the regression stage);
# RESULTS_TASKS picks tasks (the super-resolution ones: RESULTS_TASKS=$(SR_TASKS)), RESULTS_DIR the folder under $(R).
SR_TASKS := "['ct_sr_5to10mm','ct_sr_3to6mm','mr_sr_1to4mm']"
DENOISE_TASKS := "['ct_lowdose_quarter','mr_rician4']"
RESULTS_DIR := results
RESULTS_TASKS := "['ct_sr_5to10mm','ct_sr_3to6mm','ct_lowdose_quarter','ct_blur_gaussian_1mm','mr_sr_1to4mm', \
	'mr_kspace2','mr_rician4']"
release-results: $(STAMP)
	$(RUN) --config_file configs/results.json --datalist $(R)/datalist.json --ckpt_dir $(R)/models \
	    --output_dir $(R)/$(RESULTS_DIR) --methods "['classical','regression']" --tasks $(RESULTS_TASKS) \
	    > $(R)/logs/$(RESULTS_DIR).log 2>&1

# 2.5D against 3D autoencoder at equal CPU time (AE_SECONDS each, run side by side with one thread each; same
# widths 16/32/64, same patches), both on the release training volumes; then the autoencoder ceiling (plain,
# residual decoding, data consistency) on the release validation volumes: CT 5 -> 10 mm (lung1), 3 -> 6 mm (IBSI),
# MR 1 -> 4 mm (child brain MPRAGE).
A := outputs/study_autoencoder
AE_SECONDS := 2700
AE_TRAIN := --max_epochs 1000 --epoch_length 50 --val_interval 2 --lr 0.0005 --batch_size 1 \
	--patch_size "[96,96,32]" --max_seconds $(AE_SECONDS) --adv_weight 0
study-autoencoder: $(STAMP)
	mkdir -p $(A)/logs
	$(PY) -m scripts.datalist release ../shared/data $(A)/datalist_train.json --keep_validation "['ibsi_sts012_ct.nii.gz']"
	$(PY) -m scripts.datalist release ../shared/data $(A)/datalist.json
	OMP_NUM_THREADS=1 $(RUN) training --config_file "['configs/train_autoencoder.json','configs/small.json']" \
	    --datalist $(A)/datalist_train.json --ckpt_dir $(A)/3d --output_dir $(A)/3d_tb $(AE_TRAIN) \
	    > $(A)/logs/3d.log 2>&1 & a=$$!; \
	OMP_NUM_THREADS=1 $(RUN) training --config_file "['configs/train_autoencoder.json','configs/small.json', \
	    'configs/slice_autoencoder.json']" --datalist $(A)/datalist_train.json --ckpt_dir $(A)/slice \
	    --output_dir $(A)/slice_tb $(AE_TRAIN) > $(A)/logs/slice.log 2>&1 & b=$$!; \
	wait $$a && wait $$b
	$(PY) -m scripts.figures curves $(A)/curves.png \
	    --runs "{'3D autoencoder': '$(A)/3d_tb', 'slice-wise autoencoder': '$(A)/slice_tb'}"
	$(MAKE) study-autoencoder-ceilings

# The ceilings alone (the centre 192x192 of each validation slice, every slice), after study-autoencoder's training.
study-autoencoder-ceilings: $(STAMP)
	for v in 3d slice; do cfg=$$( [ $$v = slice ] && echo "'configs/small.json','configs/slice_autoencoder.json'" \
	    || echo "'configs/small.json'" ); \
	  $(RUN) --config_file configs/results.json --datalist $(A)/datalist.json --ckpt_dir $(A)/$$v \
	    --network_configs "[$$cfg]" --output_dir $(A)/results_$$v --methods "['classical','autoencoder ceiling']" \
	    --tasks "['ct_sr_5to10mm','ct_sr_3to6mm','mr_sr_1to4mm']" --crop "[192,192,-1]" \
	    > $(A)/logs/results_$$v.log 2>&1 || exit 1; done

# The two-stage chain against the one-stage ControlNet at study scale, on study-autoencoder's slice-wise
# autoencoder: its latents of the release training volumes, the small latent prior (CHAIN_SECONDS), then the two
# ControlNets side by side with one thread each (CHAIN_SECONDS each, thick-slice pairs): the one-stage one
# conditioned on the interpolated input, the two-stage one on the shipped super-resolution network's output
# (models/model.pt, frozen); then the results table on the held-out volumes (CHAIN_TASKS, centre 192x192).
C := outputs/study_chain
CHAIN_SECONDS := 1500
CHAIN_NETS := 'configs/small.json','configs/slice_autoencoder.json','configs/shipped_regression.json'
CHAIN_TASKS := ['ct_sr_3to6mm','mr_sr_1to4mm']
CHAIN_CONTROLNET = OMP_NUM_THREADS=1 $(RUN) training --config_file "['configs/train_controlnet.json',$(CHAIN_NETS)]" \
	--datalist $(A)/datalist_train.json --degradations "%configs/train_regression.json\#degradations" \
	--max_epochs 1000 --epoch_length 50 --val_interval 2 --lr 0.0005 --max_seconds $(CHAIN_SECONDS)
study-two-stage: $(STAMP)
	mkdir -p $(C)/logs $(C)/models
	cp $(A)/slice/autoencoder.pt $(A)/slice/autoencoder_scale.json models/model.pt $(C)/models/
	$(RUN) --config_file "['configs/prepare_latents.json',$(CHAIN_NETS)]" --datalist $(A)/datalist_train.json \
	    --ckpt_dir $(C)/models --output_dir $(C)/latents > $(C)/logs/latents.log 2>&1
	$(RUN) training --config_file "['configs/train_diffusion.json',$(CHAIN_NETS)]" \
	    --datalist $(C)/latents/datalist_latents.json --ckpt_dir $(C)/models --output_dir $(C)/diffusion \
	    --max_epochs 1000 --epoch_length 50 --val_interval 2 --lr 0.0005 --ema_decay 0.99 \
	    --max_seconds $(CHAIN_SECONDS) > $(C)/logs/diffusion.log 2>&1
	$(MAKE) study-two-stage-controlnets study-two-stage-results

study-two-stage-controlnets: $(STAMP)
	mkdir -p $(C)/one $(C)/two && cp $(C)/models/* $(C)/one/ && cp $(C)/models/* $(C)/two/
	$(CHAIN_CONTROLNET) --ckpt_dir $(C)/one --output_dir $(C)/one_tb > $(C)/logs/one.log 2>&1 & a=$$!; \
	$(CHAIN_CONTROLNET) --ckpt_dir $(C)/two --output_dir $(C)/two_tb --two_stage true > $(C)/logs/two.log 2>&1 & b=$$!; \
	wait $$a && wait $$b

study-two-stage-results: $(STAMP)
	$(RUN) --config_file configs/results.json --datalist $(A)/datalist.json --ckpt_dir $(C)/one \
	    --two_stage_ckpt_dir $(C)/two --network_configs "[$(CHAIN_NETS)]" --output_dir $(C)/results \
	    --methods "['classical','autoencoder ceiling','regression','ours + residual decoding','two-stage','two-stage mean']" \
	    --tasks "$(CHAIN_TASKS)" --crop "[192,192,-1]" \
	    --sliding_window "{'roi_size': [192, 192, 32], 'overlap': 0.25, 'sampling_overlap': 0.5}" \
	    > $(C)/logs/results.log 2>&1
	$(PY) -m scripts.figures curves $(C)/curves.png --runs "{'prior': '$(C)/diffusion', \
	    'one-stage ControlNet': '$(C)/one_tb', 'two-stage ControlNet': '$(C)/two_tb'}"

# For training on the development GPU machine (the library's device tool; its Python 3.12 has torch but not these):
# the missing wheels in .whl/ and the development region split in .data/regions/, both git-ignored, about 28 MB
# to name in `carry`. There: `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
# export PYTHONPATH=/tmp/site` first, then the training commands with `--datalist .data/regions/datalist.json`
# and `--max_seconds 480 --resume auto --patience 5`, so each 10-minute call ends on an epoch with its checkpoint
# and the next call goes on (the best model and the patience count survive the resume). Keep --ckpt_dir under
# outputs/ (git-ignored: it stays on the machine between calls while it is warm; a full checkpoint is too large
# to come back through $OUT, only the <stage>.pt weights, split under 16 MiB, and the logs). Every <stage>.pt of
# configs/inference.json is over 16 MiB (16.8 MB) in float32 (`python -m scripts.bench sizes`: autoencoder 21.0,
# prior 41.2, ControlNet 17.4, regression 23.0 MB) and $OUT holds 64 MiB a call, so one network comes back per
# call: there `sha256sum W.pt && split -b 15M W.pt $OUT/W.pt.part-`, here
# `cat .../W.pt.part-* > models/W.pt && sha256sum models/W.pt` (the sums must match).
# A later session (the machine given back, no checkpoint on it) goes on with `--init_weights models/W.pt` carried
# (fresh optimizer and schedule). After stage 1, run configs/results.json with
# `--methods "['classical','autoencoder ceiling']"` here before training stages 2-3.
DEVICE_WHEELS := monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pydicom==3.0.2 pynrrd==1.1.3 fire==0.7.1 \
	termcolor==3.3.0 PyWavelets==1.8.0
device-kit: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $(DEVICE_WHEELS)
	$(PY) -m scripts.datalist regions ../shared/data .data/regions

# Every multi-process (torchrun, gloo) test STRESS_RUNS times in a row with a niced busy loop beside it; a run's
# log is outputs/stress/run_N.log, the tally outputs/stress/summary.log; exits non-zero if any run failed.
STRESS_RUNS := 10
DDP_TESTS := tests/test_autoencoder.py::test_two_process_ddp_run_on_gloo \
	tests/test_controlnet.py::test_controlnet_two_process_ddp_with_mlflow \
	tests/test_diffusion.py::test_prior_two_process_ddp_with_mlflow \
	tests/test_inference.py::test_batch_inference_shards_across_processes
stress-ddp: $(STAMP)
	mkdir -p outputs/stress
	nice -n 19 $(PY) -c "while True: pass" & load=$$!; fails=0; \
	for i in $$(seq 1 $(STRESS_RUNS)); do \
	    $(PY) -m pytest -q -p no:cacheprovider $(DDP_TESTS) > outputs/stress/run_$$i.log 2>&1 || fails=$$((fails + 1)); \
	    echo "run $$i: $$(tail -1 outputs/stress/run_$$i.log)" | tee -a outputs/stress/summary.log; \
	done; kill $$load; echo "$$fails of $(STRESS_RUNS) runs failed" | tee -a outputs/stress/summary.log; [ $$fails -eq 0 ]

clean:
	rm -rf $(VENV) outputs .pytest_cache
