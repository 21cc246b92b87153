.PHONY: build test bench clean lint

build:
	pip install -e ".[dev]"

test:
	pytest -q

lint:
	ruff format --check . && ruff check .

bench:
	python -m fastchar bench --quick

clean:
	rm -rf build *.egg-info fastchar/*.so csrc/_*.c csrc/*.html  # csrc/fc_*.c are sources, not output
	find . -name '*.nbi' -o -name '*.nbc' | xargs rm -f
	find . -name __pycache__ -type d | xargs rm -rf
