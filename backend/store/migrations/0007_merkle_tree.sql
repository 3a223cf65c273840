-- The RFC 9162 Merkle tree over the log (backend/audit/merkle.py) and its signed checkpoints.
-- merkle_nodes holds every complete subtree: (level, index) covers leaves [index * 2^level,
-- (index + 1) * 2^level), leaf i being the event at position i + 1. The folder (backend/audit/folder.py)
-- inserts a batch's subtrees and moves merkle_state.tree_size in one transaction.
create table merkle_nodes (
    level smallint not null check (level between 0 and 62),
    index bigint not null check (index >= 0),
    hash  bytea not null check (length(hash) = 32),
    primary key (level, index)
);

create table merkle_state (
    singleton  boolean primary key default true check (singleton),
    tree_size  bigint not null default 0 check (tree_size >= 0),
    updated_at timestamptz not null default now()
);
insert into merkle_state default values;

-- Signed checkpoints {tree_size, root_hash, timestamp}: the signature covers the text format of
-- docs/AUDIT.md. The private key never reaches the database.
create table audit_checkpoints (
    id         bigint generated always as identity primary key,
    tree_size  bigint not null check (tree_size >= 0),
    root_hash  bytea not null check (length(root_hash) = 32),
    signed_at  timestamptz not null,
    key_id     text not null,
    signature  bytea not null check (length(signature) = 64)
);

create function audit_rows_are_immutable() returns trigger language plpgsql as $$
begin
    raise exception '% rows are immutable: % is not allowed', tg_table_name, tg_op
        using errcode = 'restrict_violation';
end
$$;

create trigger merkle_nodes_no_update_delete before update or delete on merkle_nodes
    for each row execute function audit_rows_are_immutable();
create trigger merkle_nodes_no_truncate before truncate on merkle_nodes
    for each statement execute function audit_rows_are_immutable();
create trigger audit_checkpoints_no_update_delete before update or delete on audit_checkpoints
    for each row execute function audit_rows_are_immutable();
create trigger audit_checkpoints_no_truncate before truncate on audit_checkpoints
    for each statement execute function audit_rows_are_immutable();
