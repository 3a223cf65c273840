-- One fold of the Merkle tree (0007) in one statement (backend/audit/tree_store.py, fold).
--
-- Folding in the serving process cost it about 30 k instructions per event (reading each event's
-- hash, a SHA-256 per leaf and per node in Python, the nodes' rows as JSON): a cost paid on every
-- command (docs/PERFORMANCE.md). Here the database hashes what it already holds and inserts the rows
-- it makes, so a fold is one round trip for the process. The tree is the same, byte for byte
-- (backend/audit/merkle.py): leaf = SHA-256(0x00 || position as 8 bytes big-endian || the event's hash),
-- node = SHA-256(0x01 || left || right). Auditors never take it on faith: they recompute it from the
-- events (docs/AUDIT.md).
--
-- Under merkle_state's row lock (whoever folds waits for the other, then goes on from the size it
-- finds), the leaves are the events after the stored size, in position order, up to the first gap;
-- then each level's newly complete subtrees, level by level: after leaves [size, new) are added, the
-- complete subtrees of level L not yet stored are indices [size >> L, new >> L), each from its two
-- children one level down (stored earlier, or just now). Returns the new size, how many leaves were
-- added, and the position found after a gap (null when none), which the caller reports.
--
-- Each level reads its children as one range of the primary key, in order, and pairs each right child
-- with the row before it: no join, whose plan, made from statistics taken while merkle_nodes was
-- small, could hash a whole level on every fold. A missing child leaves a pair short, and the fold fails.
create function tally_merkle_fold(max_leaves integer, out tree_size bigint, out folded bigint,
                                  out gap_at bigint)
language plpgsql volatile as $$
declare
    old_size bigint;
    lvl integer := 1;
    made bigint;
begin
    select s.tree_size into strict old_size from merkle_state s for update;
    with batch as (
        select e.position, e.hash, row_number() over (order by e.position) as n
        from (select position, hash from events where position > old_size order by position
              limit max_leaves) as e
    ), leaves as (
        insert into merkle_nodes (level, index, hash)
        select 0, b.position - 1, sha256('\x00'::bytea || int8send(b.position) || b.hash)
        from batch b where b.position = old_size + b.n
        returning 1
    )
    select (select count(*) from leaves), (select min(b.position) from batch b where b.position <> old_size + b.n)
    into folded, gap_at;
    tree_size := old_size + folded;
    while tree_size >> lvl > old_size >> lvl loop
        insert into merkle_nodes (level, index, hash)
        select lvl, c.index >> 1, sha256('\x01'::bytea || c.left_hash || c.hash)
        from (select n.index, n.hash, lag(n.index) over w as left_index, lag(n.hash) over w as left_hash
              from merkle_nodes n
              where n.level = lvl - 1 and n.index >= 2 * (old_size >> lvl) and n.index < 2 * (tree_size >> lvl)
              window w as (order by n.index)) as c
        where c.index & 1 = 1 and c.left_index = c.index - 1;
        get diagnostics made = row_count;
        if made <> (tree_size >> lvl) - (old_size >> lvl) then
            raise exception 'merkle_nodes lacks a subtree of level % below index %', lvl - 1, 2 * (tree_size >> lvl)
                using errcode = 'data_corrupted';
        end if;
        lvl := lvl + 1;
    end loop;
    if folded > 0 then
        update merkle_state set tree_size = tally_merkle_fold.tree_size, updated_at = now();
    end if;
end
$$;
