//! The Redis Cluster harness against real cluster nodes: creation over three masters, a replica promoted after
//! its master is killed, slots (and their keys) moved by a reshard.

use ferry_testkit::{RedisCluster, redis_cli};

#[test]
fn three_masters_share_the_slots_and_route_keys() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 0)?;
    let nodes = cluster.topology()?;
    let masters: Vec<_> = nodes.iter().filter(|n| n.master).collect();
    assert_eq!(masters.len(), 3, "{nodes:?}");
    assert_eq!(masters.iter().map(|m| m.slots).sum::<usize>(), 16384);
    assert!(masters.iter().all(|m| m.slots >= 5461), "{masters:?}");
    // A key lives on the master of its slot; hash tags put keys in one slot.
    let slot = cluster.slot_of("{q}:a")?;
    assert_eq!(slot, cluster.slot_of("{q}:b")?);
    let owner = cluster.master_of_slot(slot)?;
    assert_eq!(redis_cli(owner, &["SET", "{q}:a", "1"])?, "OK");
    let other = masters.iter().find(|m| m.port != owner).unwrap().port;
    assert!(
        redis_cli(other, &["GET", "{q}:a"])?.starts_with("MOVED"),
        "another master redirects"
    );
    Ok(())
}

#[test]
fn a_replica_takes_over_from_a_killed_master() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 1)?;
    let slot = cluster.slot_of("k")?;
    let old = cluster.master_of_slot(slot)?;
    redis_cli(old, &["SET", "k", "v"])?;
    // Written to the replica before the kill (WAIT), so the promoted replica has it.
    assert_eq!(redis_cli(old, &["WAIT", "1", "5000"])?, "1");
    let i = cluster.index_of(old).unwrap();
    cluster.node(i).kill();
    cluster.wait_settled()?;
    let new = cluster.master_of_slot(slot)?;
    assert_ne!(new, old);
    assert_eq!(redis_cli(new, &["GET", "k"])?, "v");
    // The old master comes back as a replica of the new one.
    cluster.node(i).restart()?;
    cluster.wait_settled()?;
    let back = cluster
        .topology()?
        .into_iter()
        .find(|n| n.port == old)
        .unwrap();
    assert!(!back.master, "{back:?}");
    Ok(())
}

#[test]
fn a_reshard_moves_slots_and_their_keys() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 0)?;
    let slot = cluster.slot_of("moved")?;
    let from_port = cluster.master_of_slot(slot)?;
    redis_cli(from_port, &["SET", "moved", "yes"])?;
    let nodes = cluster.topology()?;
    let from = nodes.iter().find(|n| n.port == from_port).unwrap().clone();
    let to = nodes
        .iter()
        .find(|n| n.master && n.port != from_port)
        .unwrap()
        .clone();
    // Everything `from` has: the key's slot goes too.
    cluster.reshard(&from.id, &to.id, from.slots)?;
    assert_eq!(cluster.master_of_slot(slot)?, to.port);
    assert_eq!(redis_cli(to.port, &["GET", "moved"])?, "yes");
    let after = cluster.topology()?;
    let slots = |port| after.iter().find(|n| n.port == port).unwrap().slots;
    assert_eq!(
        (slots(from.port), slots(to.port)),
        (0, to.slots + from.slots)
    );
    Ok(())
}
