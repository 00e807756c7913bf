# Stubs of the native module (python/src/*.rs); checked against it by mypy.stubtest.
# Results are plain dicts and lists; blockferry._types turns them into typed objects.

from typing import Any, Callable, Dict, List, Optional, Tuple, final

__all__ = [
    "version",
    "error_kinds",
    "image_info",
    "image_map",
    "parse_changes",
    "discover",
    "discover_vms",
    "inspect_image",
    "validate",
    "default_state_dir",
    "jobs",
    "abandon_job",
    "start_convert",
    "Store",
    "SyncRun",
    "Task",
    "Waker",
]

def version() -> str: ...
def error_kinds() -> List[str]: ...
def image_info(
    path: str, *, disk: Optional[str] = ..., allow_outside_folder: bool = ...
) -> Dict[str, Any]: ...
def image_map(
    path: str, *, disk: Optional[str] = ..., allow_outside_folder: bool = ...
) -> List[Tuple[int, int, str, Optional[str], Optional[int]]]: ...
def parse_changes(
    disk_size: int,
    *,
    path: Optional[str] = ...,
    data: Optional[bytes] = ...,
    format: Optional[str] = ...,
) -> Dict[str, Any]: ...
def discover(folder: str, *, allow_outside_folder: bool = ...) -> List[Dict[str, Any]]: ...
def discover_vms(folder: str, *, allow_outside_folder: bool = ...) -> List[Dict[str, Any]]: ...
def inspect_image(
    path: str, *, disk: Optional[str] = ..., allow_outside_folder: bool = ...
) -> Dict[str, Any]: ...
def validate(
    path: str, *, target: str, store: Optional[Store] = ..., allow_outside_folder: bool = ...
) -> Dict[str, Any]: ...
def default_state_dir() -> str: ...
def jobs(*, state_dir: Optional[str] = ...) -> List[Dict[str, Any]]: ...
def abandon_job(
    job: str, *, state_dir: Optional[str] = ..., s3: Optional[Dict[str, Any]] = ...
) -> Dict[str, Any]: ...
def start_convert(
    image: str,
    out: str,
    *,
    disk: Optional[str] = ...,
    allow_outside_folder: bool = ...,
    force: bool = ...,
    workers: int = ...,
    progress: Optional[Callable[[Any], Any]] = ...,
    progress_interval: float = ...,
) -> Task: ...
@final
class Task:
    @property
    def kind(self) -> str: ...
    def cancel(self) -> None: ...
    def cancelled(self) -> bool: ...
    def done(self) -> bool: ...
    def progress(self) -> Optional[Dict[str, Any]]: ...
    def wait(self, timeout: Optional[float] = ...) -> bool: ...
    def next_events(self, timeout: Optional[float] = ...) -> List[Dict[str, Any]]: ...
    def result(self) -> Any: ...
    def waker(self) -> Waker: ...

@final
class Waker:
    def fileno(self) -> int: ...
    def drain(self) -> None: ...

@final
class SyncRun:
    @property
    def disk(self) -> str: ...
    def status(self) -> Dict[str, Any]: ...
    def base(self) -> Dict[str, Any]: ...
    def fail_cycle(self) -> Dict[str, Any]: ...
    def start_cycle(
        self,
        changes_data: Optional[bytes] = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...

@final
class Store:
    @staticmethod
    def init(
        location: str,
        *,
        passphrase: Optional[bytes],
        chunk_size: int = ...,
        s3: Optional[Dict[str, Any]] = ...,
        state_dir: Optional[str] = ...,
    ) -> Dict[str, Any]: ...
    @staticmethod
    def open(
        location: str,
        *,
        passphrase: Optional[bytes] = ...,
        s3: Optional[Dict[str, Any]] = ...,
        state_dir: Optional[str] = ...,
    ) -> Store: ...
    def config(self) -> Dict[str, Any]: ...
    def snapshots(self) -> Tuple[List[Dict[str, Any]], List[BaseException]]: ...
    def start_sync(
        self,
        image: str,
        *,
        changes: Optional[str] = ...,
        changes_dir: Optional[str] = ...,
        changes_given: bool = ...,
        changes_format: Optional[str] = ...,
        name: Optional[str] = ...,
        disk: Optional[str] = ...,
        allow_outside_folder: bool = ...,
        verify_sample: float = ...,
        workers: int = ...,
        memory_budget: int = ...,
        bwlimit: Optional[int] = ...,
        state_dir: Optional[str] = ...,
        no_state: bool = ...,
    ) -> SyncRun: ...
    def inspect(self, spec: str) -> Dict[str, Any]: ...
    def snapshot(self, spec: str) -> Dict[str, Any]: ...
    def prune(
        self,
        *,
        keep_last: int = ...,
        keep_daily: int = ...,
        keep_weekly: int = ...,
        keep_monthly: int = ...,
        disk: Optional[str] = ...,
        dry_run: bool = ...,
    ) -> Dict[str, Any]: ...
    def cleanup(
        self,
        *,
        older_than: float = ...,
        dry_run: bool = ...,
        state_dir: Optional[str] = ...,
        include_stopped_jobs: bool = ...,
    ) -> Dict[str, Any]: ...
    def start_replicate(
        self,
        image: str,
        *,
        disk: Optional[str] = ...,
        name: Optional[str] = ...,
        same_disk: bool = ...,
        wait: float = ...,
        allow_outside_folder: bool = ...,
        workers: int = ...,
        compression: bool = ...,
        memory_budget: int = ...,
        io_engine: str = ...,
        io_depth: int = ...,
        direct: bool = ...,
        upload_jobs: int = ...,
        part_size: int = ...,
        bwlimit: Optional[int] = ...,
        base: Optional[str] = ...,
        changes: Optional[str] = ...,
        changes_data: Optional[bytes] = ...,
        changes_format: Optional[str] = ...,
        changes_hash: bool = ...,
        changes_from_chain: bool = ...,
        change_id: Optional[str] = ...,
        verify_sample: float = ...,
        state_dir: Optional[str] = ...,
        no_state: bool = ...,
        restart: bool = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
    def start_restore(
        self,
        snapshot: str,
        out: str,
        *,
        force: bool = ...,
        salvage: bool = ...,
        workers: int = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
    def start_export(
        self,
        snapshot: str,
        out: str,
        *,
        format: str,
        force: bool = ...,
        workers: int = ...,
        memory_budget: int = ...,
        jobs: int = ...,
        part_size: int = ...,
        base_export: Optional[str] = ...,
        incremental: bool = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
    def start_cutover(
        self,
        image: str,
        *,
        to: str,
        max_downtime: float,
        format: str = ...,
        now: bool = ...,
        interval: float = ...,
        max_cycles: int = ...,
        pre_hook: Optional[str] = ...,
        post_hook: Optional[str] = ...,
        rollback_hook: Optional[str] = ...,
        hook_timeout: float = ...,
        changes: str = ...,
        name: Optional[str] = ...,
        verify_sample: float = ...,
        state_dir: Optional[str] = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
    def start_verify(
        self,
        snapshot: str,
        *,
        image: Optional[str] = ...,
        disk: Optional[str] = ...,
        allow_outside_folder: bool = ...,
        workers: int = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
    def start_gc(
        self,
        *,
        max_unused: float = ...,
        wait: float = ...,
        dry_run: bool = ...,
        progress: Optional[Callable[[Any], Any]] = ...,
        progress_interval: float = ...,
    ) -> Task: ...
