# One cluster node per entry of var.nodes: a fixed-IP network interface, an EBS volume, a launch
# template whose user data runs cps-attach, and a one-instance Auto Scaling group in the node's
# subnet with a launching lifecycle hook. cps-attach (at boot) attaches the node's volume and
# interface, writes its files, runs its hooks and completes the hook; cps-roll (here, on
# template changes) replaces outdated nodes one at a time.

data "aws_region" "current" {}

data "aws_subnet" "node" {
  for_each = local.nodes
  id       = each.value.node_subnet_id
}

locals {
  nodes = { for n in var.nodes : n.node_id => n }
  files = { for f in var.node_files : f.node_id => f.node_files_toupload }
  # What the node files read at boot: the nodes' role may read these and nothing else.
  secrets = distinct(flatten([for f in var.node_files : [for u in f.node_files_toupload : u.content_from if u.content_from != null]]))
  hook    = "${var.app_name}-launch"

  cluster_tags = merge(var.tags, { "cps:cluster" = var.app_name })
  node_tags = {
    for id, n in local.nodes : id => merge(local.cluster_tags, {
      "cps:node-id" = id
      Name          = "${var.app_name}-${id}"
    })
  }
}

module "node_config" {
  source   = "./modules/node-config"
  for_each = local.nodes

  cluster_name            = var.app_name
  node_id                 = each.key
  lifecycle_hook_name     = local.hook
  data_volume             = var.data_volume
  encrypted               = var.encrypted
  kms_key_id              = var.kms_key_id
  files                   = lookup(local.files, each.key, [])
  node_config_script      = var.node_config_script
  configure_command       = var.configure_command
  health_command          = var.health_command
  command_timeout_seconds = var.command_timeout_seconds
  cps_attach_source       = var.cps_attach_source
  cps_attach_path         = var.cps_attach_path
  region                  = data.aws_region.current.name
  relocation = var.relocation == "never" ? null : {
    mode          = var.relocation
    lock_table    = aws_dynamodb_table.relocation_lock[0].name
    delete_source = var.relocation_delete_source
  }
}

# The data volumes and the fixed-IP interfaces outlive the cluster's servers, its nodes list and
# `terraform destroy`: by default (retain_on_destroy = true) they are the `node` resources, which
# Terraform refuses to destroy (prevent_destroy), so removing a node, destroying the module or a
# change that would replace them fails the plan instead of deleting data. Terraform takes only
# literal lifecycle settings, so the opt-out is a second pair of resources, `deletable`, whose
# volumes leave a final snapshot when deleted; a node's objects are in exactly one of the two.
# Moving between them is a state move (README: "Deleting the data"), never a plan: the
# `retention` marker below remembers the choice the state was made with and fails any plan made
# with the other.
resource "terraform_data" "retention" {
  input = { retain_on_destroy = var.retain_on_destroy }
  lifecycle {
    # Changed only on purpose: `terraform apply -replace` of this marker, after the state move.
    ignore_changes = [input]
  }
}

locals {
  retained_nodes  = var.retain_on_destroy ? local.nodes : {}
  deletable_nodes = var.retain_on_destroy ? {} : local.nodes
  retention_error = <<-EOT
    retain_on_destroy is ${var.retain_on_destroy} but this state was made with ${!var.retain_on_destroy}: this plan would destroy every data volume and interface and make empty ones. Move the state first, then record the new choice (terraform/README.md, "Deleting the data"):
      terraform state mv MODULE.aws_ebs_volume.${var.retain_on_destroy ? "deletable" : "node"} MODULE.aws_ebs_volume.${var.retain_on_destroy ? "node" : "deletable"}
      terraform state mv MODULE.aws_network_interface.${var.retain_on_destroy ? "deletable" : "node"} MODULE.aws_network_interface.${var.retain_on_destroy ? "node" : "deletable"}
      terraform apply -replace=MODULE.terraform_data.retention
  EOT

  # What replaces an EBS volume in the AWS provider (zone, encryption, key, source snapshot) is
  # ignored on an existing volume: its data stays where it is. A new zone is cps-attach's to
  # take over (relocation = "snapshot"), refused otherwise (the postcondition); new encryption
  # settings apply to the volumes created from now on (check "data_volumes_as_configured").
  # `cps:filesystem` is cps-attach's format journal and `cps:node-id` the identity it removes
  # from a volume it relocated away from: neither is Terraform's to put back.
  zone_error = "moves to another zone than its data volume's. Set relocation = \"snapshot\" to let cps-attach move the data (snapshot, new volume in the new zone), or keep the node's subnet in its volume's zone (terraform/README.md, \"Moving a node to another zone\")."
}

resource "aws_network_interface" "node" {
  for_each        = local.retained_nodes
  subnet_id       = each.value.node_subnet_id
  private_ips     = [each.value.node_ip]
  security_groups = var.security_groups
  description     = "Fixed IP of ${var.app_name} node ${each.key}"
  tags            = local.node_tags[each.key]

  lifecycle {
    prevent_destroy = true
    precondition {
      condition     = terraform_data.retention.output.retain_on_destroy == var.retain_on_destroy
      error_message = local.retention_error
    }
  }
}

resource "aws_network_interface" "deletable" {
  for_each        = local.deletable_nodes
  subnet_id       = each.value.node_subnet_id
  private_ips     = [each.value.node_ip]
  security_groups = var.security_groups
  description     = "Fixed IP of ${var.app_name} node ${each.key}"
  tags            = local.node_tags[each.key]

  lifecycle {
    precondition {
      condition     = terraform_data.retention.output.retain_on_destroy == var.retain_on_destroy
      error_message = local.retention_error
    }
  }
}

resource "aws_ebs_volume" "node" {
  for_each          = local.retained_nodes
  availability_zone = data.aws_subnet.node[each.key].availability_zone
  size              = var.data_volume.size_in_gibs
  type              = var.data_volume.type
  iops              = var.data_volume.iops
  throughput        = var.data_volume.throughput_mib_per_sec
  encrypted         = var.encrypted
  kms_key_id        = var.kms_key_id
  final_snapshot    = var.final_snapshot
  tags              = merge(var.data_volume.tags, local.node_tags[each.key])

  lifecycle {
    prevent_destroy = true
    ignore_changes  = [availability_zone, encrypted, kms_key_id, snapshot_id, tags["cps:filesystem"], tags["cps:node-id"]]
    precondition {
      condition     = terraform_data.retention.output.retain_on_destroy == var.retain_on_destroy
      error_message = local.retention_error
    }
    postcondition {
      condition     = var.relocation != "never" || self.availability_zone == data.aws_subnet.node[each.key].availability_zone
      error_message = "Node ${each.key} (subnet ${each.value.node_subnet_id}, ${data.aws_subnet.node[each.key].availability_zone}; its volume ${self.id} is in ${self.availability_zone}) ${local.zone_error}"
    }
  }
}

resource "aws_ebs_volume" "deletable" {
  for_each          = local.deletable_nodes
  availability_zone = data.aws_subnet.node[each.key].availability_zone
  size              = var.data_volume.size_in_gibs
  type              = var.data_volume.type
  iops              = var.data_volume.iops
  throughput        = var.data_volume.throughput_mib_per_sec
  encrypted         = var.encrypted
  kms_key_id        = var.kms_key_id
  final_snapshot    = var.final_snapshot
  tags              = merge(var.data_volume.tags, local.node_tags[each.key])

  lifecycle {
    ignore_changes = [availability_zone, encrypted, kms_key_id, snapshot_id, tags["cps:filesystem"], tags["cps:node-id"]]
    precondition {
      condition     = terraform_data.retention.output.retain_on_destroy == var.retain_on_destroy
      error_message = local.retention_error
    }
    postcondition {
      condition     = var.relocation != "never" || self.availability_zone == data.aws_subnet.node[each.key].availability_zone
      error_message = "Node ${each.key} (subnet ${each.value.node_subnet_id}, ${data.aws_subnet.node[each.key].availability_zone}; its volume ${self.id} is in ${self.availability_zone}) ${local.zone_error}"
    }
  }
}

locals {
  volumes    = merge(aws_ebs_volume.node, aws_ebs_volume.deletable)
  interfaces = merge(aws_network_interface.node, aws_network_interface.deletable)
  # (Conditionals, not ||: a new volume's key is unknown until it exists.)
  volumes_not_as_configured = [for id, v in local.volumes : "${v.id} (node ${id})" if v.encrypted != var.encrypted || (var.kms_key_id == null ? false : v.kms_key_id != var.kms_key_id)]
}

# Encryption settings changed after the volumes were made apply to new volumes only (a relocated
# or restored one, a new node): say so at every plan until the old ones are replaced on purpose.
check "data_volumes_as_configured" {
  assert {
    condition     = length(local.volumes_not_as_configured) == 0
    error_message = "Data volumes ${join(", ", local.volumes_not_as_configured)} keep their encryption settings: encrypted/kms_key_id apply to volumes created from now on. To re-encrypt one, snapshot it, copy the snapshot with the new key and move the node onto a volume made from it (docs/operations.md)."
  }
}

resource "aws_launch_template" "node" {
  for_each      = local.nodes
  name_prefix   = "${var.app_name}-${each.key}-"
  image_id      = coalesce(each.value.node_image, var.node_image)
  instance_type = var.instance_type
  key_name      = var.node_key_name
  user_data     = base64encode(module.node_config[each.key].user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.http_put_response_hop_limit
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_volume.device_name
    ebs {
      volume_size           = var.root_volume.size_in_gibs
      volume_type           = var.root_volume.type
      encrypted             = var.encrypted
      kms_key_id            = var.kms_key_id
      delete_on_termination = true
    }
  }

  network_interfaces {
    device_index                = 0
    subnet_id                   = each.value.node_subnet_id
    security_groups             = var.security_groups
    associate_public_ip_address = false
    delete_on_termination       = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = local.node_tags[each.key]
  }

  tags = local.node_tags[each.key]

  lifecycle {
    precondition {
      condition     = var.node_config_script == null || (length(var.configure_command) == 0 && length(var.health_command) == 0)
      error_message = "Give either node_config_script or configure_command/health_command, not both."
    }
  }
}

resource "aws_autoscaling_group" "node" {
  for_each            = local.nodes
  name                = "${var.app_name}-${each.key}"
  min_size            = 1
  max_size            = 1
  desired_capacity    = 1
  vpc_zone_identifier = [each.value.node_subnet_id]
  health_check_type   = "EC2"
  # Nodes wait in Pending:Wait until healthy; the roll (not Terraform) waits for InService, so a
  # slow first boot never taints a group and gets it replaced outside the roll.
  wait_for_capacity_timeout = "0"

  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }

  initial_lifecycle_hook {
    name                 = local.hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    heartbeat_timeout    = var.asg_lifecycle_hook_heartbeat_timeout
    default_result       = var.lifecycle_default_result
  }

  dynamic "tag" {
    for_each = local.node_tags[each.key]
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # The volume and interface exist before the first instance boots and looks for them.
  depends_on = [aws_ebs_volume.node, aws_ebs_volume.deletable, aws_network_interface.node, aws_network_interface.deletable, aws_iam_role_policy.node]
}

# Replaces outdated nodes one at a time whenever a launch template gets a new version.
resource "terraform_data" "roll" {
  count            = var.roll_enabled ? 1 : 0
  triggers_replace = { for id, lt in aws_launch_template.node : id => lt.latest_version }

  provisioner "local-exec" {
    command = "${var.roll_command} run --cluster ${var.app_name} --timeout ${var.asg_inservice_timeout_in_mins}m"
    environment = {
      AWS_REGION = data.aws_region.current.name
    }
  }

  depends_on = [aws_autoscaling_group.node]
}
