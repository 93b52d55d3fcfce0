FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install --no-cache-dir ".[speed]" && useradd --system --uid 10001 worker
USER worker
ENTRYPOINT ["update-worker"]
CMD ["run"]
