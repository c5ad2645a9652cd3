# The data's life in the module, against a mocked provider: retained by default, the opt-out
# (deletable, with a final snapshot), the guard on switching between them, the relocation lock
# and its IAM scoping, scheduled snapshots. What a retained cluster refuses (destroy, removing a
# node, a replacement) fails a plan, which a passing test cannot show: tests/retained, checked
# by ci/terraform/run. The applies here use deletable volumes, so the teardown can delete them.

# The mocked values every test of the module shares.
mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  app_name      = "kafka"
  node_image    = "ami-0123456789abcdef0"
  instance_type = "m6i.large"
  nodes = [
    { node_id = "1", node_ip = "10.0.1.11", node_subnet_id = "subnet-a" },
    { node_id = "2", node_ip = "10.0.2.12", node_subnet_id = "subnet-b" },
    { node_id = "3", node_ip = "10.0.3.13", node_subnet_id = "subnet-c" },
  ]
  security_groups = ["sg-0123456789abcdef0"]
  data_volume = {
    size_in_gibs           = 100
    type                   = "gp3"
    mount_path             = "/var/lib/kafka"
    file_system_type       = "xfs"
    mount_path_owner_user  = "kafka"
    mount_path_owner_group = "kafka"
  }
  roll_command = "true"
}

run "retained_by_default_and_nothing_for_relocation" {
  command = plan
  assert {
    condition     = length(aws_ebs_volume.node) == 3 && length(aws_network_interface.node) == 3 && length(aws_ebs_volume.deletable) == 0 && length(aws_network_interface.deletable) == 0
    error_message = "volumes and interfaces are the retained (prevent_destroy) resources by default"
  }
  assert {
    condition     = length(aws_dynamodb_table.relocation_lock) == 0 && alltrue([for id, m in module.node_config : !strcontains(m.yaml, "relocation")])
    error_message = "relocation = never: no lock table, nothing rendered"
  }
  assert {
    condition     = length([for a in output.iam_actions : a if contains(["ec2:CreateSnapshot", "ec2:DescribeSnapshots", "ec2:DeleteTags", "ec2:DeleteVolume"], a) || startswith(a, "dynamodb:")]) == 0
    error_message = "no snapshot, lease or retiring actions without relocation"
  }
  assert {
    condition     = length(aws_dlm_lifecycle_policy.snapshots) == 0 && length(aws_iam_role.dlm) == 0
    error_message = "no scheduled snapshots unless asked for"
  }
}

run "deletable_when_opted_out_with_a_final_snapshot" {
  variables {
    retain_on_destroy = false
    relocation        = "snapshot"
  }
  assert {
    condition     = length(aws_ebs_volume.node) == 0 && length(aws_network_interface.node) == 0 && length(aws_ebs_volume.deletable) == 3 && length(aws_network_interface.deletable) == 3
    error_message = "retain_on_destroy = false: the deletable resources"
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.deletable : v.final_snapshot])
    error_message = "a deletable volume leaves a final snapshot"
  }
  assert {
    condition     = output.node_volume_ids == { for id, v in aws_ebs_volume.deletable : id => v.id } && output.node_interface_ids == { for id, e in aws_network_interface.deletable : id => e.id }
    error_message = "the outputs follow the volumes and interfaces to either resource"
  }
  # The relocation lock.
  assert {
    condition     = aws_dynamodb_table.relocation_lock[0].name == "kafka-cps-relocation" && aws_dynamodb_table.relocation_lock[0].billing_mode == "PAY_PER_REQUEST" && aws_dynamodb_table.relocation_lock[0].hash_key == "key" && one(aws_dynamodb_table.relocation_lock[0].attribute).type == "S"
    error_message = "an on-demand table named after the app, partition key `key` (S)"
  }
  assert {
    condition     = aws_dynamodb_table.relocation_lock[0].server_side_encryption[0].enabled && !aws_dynamodb_table.relocation_lock[0].point_in_time_recovery[0].enabled
    error_message = "server-side encrypted; point-in-time recovery off by default"
  }
  assert {
    condition     = alltrue([for id, m in module.node_config : yamldecode(m.yaml).relocation == { mode = "snapshot", "lock-table" = "kafka-cps-relocation", "delete-source" = false }])
    error_message = "every node config names the lock table"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "RelocationLease"]) == { Sid = "RelocationLease", Effect = "Allow", Action = ["dynamodb:GetItem", "dynamodb:UpdateItem"], Resource = "arn:aws:dynamodb:eu-west-1:123456789012:table/kafka-cps-relocation" }
    error_message = "the lease actions on exactly the lock table"
  }
  assert {
    condition     = length([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if anytrue([for a in s.Action : startswith(a, "dynamodb:")])]) == 1
    error_message = "no other statement grants DynamoDB"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "RetireClusterVolume"]).Condition == { StringEquals = { "aws:ResourceTag/cps:cluster" = "kafka" }, "ForAllValues:StringEquals" = { "aws:TagKeys" = ["cps:node-id", "cps:slot"] }, Null = { "aws:TagKeys" = "false" } }
    error_message = "DeleteTags: the cluster's volumes, identity keys only, and the keys must be named"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "CreateClusterSnapshot"]).Condition == { StringEquals = { "aws:RequestTag/cps:cluster" = "kafka" } } && one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "CreateVolumeFromClusterSnapshot"]).Resource == "arn:aws:ec2:*::snapshot/*"
    error_message = "snapshots made with the cluster tag; volumes made from the cluster's snapshots"
  }
  assert {
    condition     = !contains(output.iam_actions, "ec2:DeleteVolume")
    error_message = "no DeleteVolume without relocation_delete_source"
  }
}

run "a_deletion_without_a_final_snapshot_is_asked_for_by_name" {
  command = plan
  variables {
    retain_on_destroy = false
    relocation        = "snapshot"
    final_snapshot    = false
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.deletable : !v.final_snapshot])
    error_message = "final_snapshot = false turns it off"
  }
}

run "opted_out_removing_a_node_deletes_its_volume" {
  command = plan
  variables {
    retain_on_destroy = false
    relocation        = "snapshot"
    nodes = [
      { node_id = "1", node_ip = "10.0.1.11", node_subnet_id = "subnet-a" },
      { node_id = "2", node_ip = "10.0.2.12", node_subnet_id = "subnet-b" },
    ]
  }
  assert {
    condition     = keys(aws_ebs_volume.deletable) == ["1", "2"] && keys(aws_network_interface.deletable) == ["1", "2"]
    error_message = "node 3's volume and interface go"
  }
}

run "delete_source_deletes_only_retired_cluster_volumes" {
  command = plan
  variables {
    retain_on_destroy        = false
    relocation               = "snapshot"
    relocation_delete_source = true
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "DeleteRetiredClusterVolume"]) == { Sid = "DeleteRetiredClusterVolume", Effect = "Allow", Action = ["ec2:DeleteVolume"], Resource = "arn:aws:ec2:*:*:volume/*", Condition = { StringEquals = { "aws:ResourceTag/cps:cluster" = "kafka" }, Null = { "aws:ResourceTag/cps:node-id" = "true", "aws:ResourceTag/cps:slot" = "true" } } }
    error_message = "DeleteVolume on the cluster's volumes that carry no node id or slot"
  }
  assert {
    condition     = alltrue([for id, m in module.node_config : yamldecode(m.yaml).relocation["delete-source"]])
    error_message = "delete-source rendered"
  }
}

run "back_to_retained_without_a_state_move_is_refused" {
  command = plan
  variables {
    relocation = "snapshot"
  }
  expect_failures = [aws_ebs_volume.node, aws_network_interface.node]
}

run "scheduled_snapshots" {
  command = plan
  variables {
    retain_on_destroy = false
    relocation        = "snapshot"
    snapshots         = { interval_hours = 12, retain = 14 }
  }
  assert {
    condition     = aws_dlm_lifecycle_policy.snapshots[0].policy_details[0].target_tags == tomap({ "cps:cluster" = "kafka" }) && one(aws_dlm_lifecycle_policy.snapshots[0].policy_details[0].resource_types) == "VOLUME"
    error_message = "the cluster's volumes, by its tag"
  }
  assert {
    condition     = aws_dlm_lifecycle_policy.snapshots[0].policy_details[0].schedule[0].create_rule[0].interval == 12 && aws_dlm_lifecycle_policy.snapshots[0].policy_details[0].schedule[0].retain_rule[0].count == 14 && aws_dlm_lifecycle_policy.snapshots[0].policy_details[0].schedule[0].copy_tags
    error_message = "every 12 hours, 14 kept, the volume's tags copied (cps:node-id says whose)"
  }
  assert {
    condition     = aws_iam_role_policy_attachment.dlm[0].policy_arn == "arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole" && strcontains(aws_iam_role.dlm[0].assume_role_policy, "dlm.amazonaws.com")
    error_message = "DLM's own role with the managed policy"
  }
}

run "a_snapshot_interval_dlm_does_not_offer_is_refused" {
  command = plan
  variables {
    retain_on_destroy = false
    relocation        = "snapshot"
    snapshots         = { interval_hours = 5, retain = 3 }
  }
  expect_failures = [var.snapshots]
}
